"""Error types the zoo raises on purpose, so callers can tell a documented limit from a bug."""


class UnsupportedError(NotImplementedError):
    """A generic call (timm, torch.jit, a data config) that a model does not support.

    The message says what was asked, why this model cannot do it, and what to use instead.
    """


class NotScriptable:
    """Mixin for models that TorchScript cannot compile: ``torch.jit.script`` raises UnsupportedError
    naming the supported paths instead of failing deep inside the TorchScript frontend."""

    def __prepare_scriptable__(self):
        raise UnsupportedError(
            f"{type(self).__name__} is not TorchScript-scriptable; use torch.compile(model) or "
            "torch.export.export(model, example_inputs) instead")


class NoImageDataConfig(dict):
    """``pretrained_cfg`` of a model that takes no 2-D RGB image (volumes, point clouds, latents).

    A plain dict, except that ``.get`` of an image-preprocessing field (what
    ``timm.data.resolve_data_config`` reads) raises UnsupportedError instead of letting timm fill in
    ImageNet defaults. ``alternative`` names what prepares this model's inputs instead.
    """

    IMAGE_FIELDS = ("interpolation", "mean", "std", "crop_pct", "test_crop_pct", "crop_mode")

    def __init__(self, cfg, alternative: str):
        super().__init__(cfg)
        self.alternative = alternative

    def get(self, key, default=None):
        if key in self.IMAGE_FIELDS:
            arch = dict.get(self, "architecture") or "this model"
            raise UnsupportedError(
                f"image data config ({key!r}, e.g. timm.data.resolve_data_config / create_transform) asked of "
                f"{arch}, which takes no 2-D RGB image; use {self.alternative} instead")
        return super().get(key, default)


class NoClassifierApi:
    """Mixin for models that are neither image classifiers nor feature backbones (latent DiTs, point
    and token networks): timm's classifier / feature calls raise UnsupportedError naming what to use.

    ``_supported_calls`` (class attribute) says which methods give this model's outputs instead.
    """

    _supported_calls = "forward(**model.example_inputs())"

    def _no_classifier_api(self, what: str):
        raise UnsupportedError(
            f"{what} asked of {type(self).__name__}, which has no classifier head or image feature "
            f"pyramid; use {self._supported_calls} instead")

    def get_classifier(self):
        self._no_classifier_api("get_classifier()")

    def reset_classifier(self, num_classes: int = 0, global_pool=None):
        self._no_classifier_api(f"reset_classifier({num_classes!r})")

    def forward_intermediates(self, *args, **kwargs):
        self._no_classifier_api("forward_intermediates()")

    def prune_intermediate_layers(self, *args, **kwargs):
        self._no_classifier_api("prune_intermediate_layers()")


def check_batch(x, where: str) -> None:
    """A clear error for an empty batch, which the models' token reshapes cannot represent."""
    import torch

    if isinstance(x, torch.fx.Proxy):    # symbolic tracing: no concrete batch size to check
        return
    if x.shape[0] == 0:
        raise ValueError(f"{where}: got an empty batch (input shape {tuple(x.shape)}); pass at least one sample")
