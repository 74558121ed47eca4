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
