"""mmengine model wrapper around any timm (or zoo) classifier, plus its data preprocessor.

The wrapped network lives at ``self.model``, so mmengine checkpoints carry a ``model.`` key prefix;
tools/export.py strips it to give a plain timm state dict.
"""
import difflib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.structures import BaseDataElement
from timm.data import resolve_data_config
from timm.data.mixup import cutmix_bbox_and_lam
from timm.models import get_arch_name

from zoo.registry import MODELS

__all__ = ["ClsDataPreprocessor", "TimmClassifier", "build_data_preprocessor", "check_model_name", "gt_labels"]


def check_model_name(model_name: str) -> None:
    """Raise a ValueError naming close matches when ``model_name`` is not registered with timm."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty timm/zoo model name, got {model_name!r}")
    arch = get_arch_name(model_name)
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model name {model_name!r}: it is neither a timm nor a zoo model "
        f"(see timm.list_models() / zoo.list_models()).{hint}")


def build_data_preprocessor(cfg: Optional[Union[dict, nn.Module]], default_type: str) -> nn.Module:
    """A model wrapper's data preprocessor from a config (built in the zoo scope, so it resolves
    without a Runner's default scope) or a module; ``None`` gives ``default_type``."""
    if isinstance(cfg, nn.Module):
        return cfg
    return MODELS.build(dict(type=default_type) if cfg is None else cfg)


@MODELS.register_module()
class ClsDataPreprocessor(BaseDataPreprocessor):
    """Stacks images, moves them to the device and normalises them on the device.

    Inputs may be uint8 (0..255) or float (0..1); ``mean``/``std`` use timm's 0..1 convention.
    Leaving them as None lets :class:`TimmClassifier` fill them from the model's data config.
    ``random_erasing`` (kwargs of ``timm.data.RandomErasing``) is applied in training only, after
    normalisation, the way timm's training loader does it.
    """

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 random_erasing: Optional[dict] = None, non_blocking: bool = False):
        super().__init__(non_blocking=non_blocking)
        self._has_norm = mean is not None
        self.register_buffer("mean", torch.zeros(0), persistent=False)
        self.register_buffer("std", torch.ones(0), persistent=False)
        if mean is not None:
            self.set_normalization(mean, std)
        self.random_erasing_cfg = dict(random_erasing) if random_erasing else None
        self._random_erasing = None

    @property
    def has_normalization(self) -> bool:
        return self._has_norm

    def set_normalization(self, mean: Sequence[float], std: Optional[Sequence[float]]) -> None:
        if std is None or len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got mean={mean} std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.mean.device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.std.device).view(-1, 1, 1)
        self._has_norm = True

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        if isinstance(inputs, (list, tuple)):
            inputs = torch.stack(list(inputs))
        if inputs.dtype == torch.uint8:
            inputs = inputs.float().div_(255.0)
        else:
            inputs = inputs.float()
        if self._has_norm:
            mean, std = self.mean, self.std
            if mean.shape[0] != inputs.shape[1]:
                if mean.shape[0] == 3 and inputs.shape[1] == 1:   # grey input, RGB statistics
                    mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
                else:
                    raise ValueError(
                        f"input has {inputs.shape[1]} channels but mean/std have {mean.shape[0]}")
            inputs = (inputs - mean) / std
        if training and self.random_erasing_cfg:
            if self._random_erasing is None:
                from timm.data import RandomErasing
                self._random_erasing = RandomErasing(device=str(inputs.device), **self.random_erasing_cfg)
            inputs = self._random_erasing(inputs)
        return dict(inputs=inputs, data_samples=data.get("data_samples"))


def gt_labels(data_samples: Sequence[BaseDataElement], device) -> torch.Tensor:
    """The batch's ``gt_label`` fields as a long tensor on ``device``."""
    if data_samples is None or any("gt_label" not in ds for ds in data_samples):
        raise ValueError("mode='loss' needs data_samples with a gt_label field")
    return torch.as_tensor([int(ds.gt_label) for ds in data_samples], dtype=torch.long, device=device)


@MODELS.register_module()
class TimmClassifier(BaseModel):
    """Any ``timm.create_model`` classifier (zoo models included) as an mmengine model.

    Args:
        model_name: timm or zoo model name, optionally with a ``.tag``.
        pretrained: load the name's pretrained weights; they are marked initialised so that
            ``Runner.train()``'s ``init_weights`` leaves them alone.
        num_classes: classifier width.
        label_smoothing: smoothing of the training targets.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) mixing in training; with both set, each batch
            picks one of the two with probability ``switch_prob``; ``mix_prob`` is the chance that a
            batch is mixed at all (timm's ``mixup_prob``).
        grad_checkpointing: recompute activations in backward (timm's ``set_grad_checkpointing``).
        model_kwargs: extra ``timm.create_model`` kwargs (``img_size``, ``in_chans``, ``drop_path_rate`` …).
        distillation: DeiT-style distillation, ``dict(teacher=NAME, type='hard'|'soft', alpha=0.5,
            tau=1.0, pretrained=True, teacher_kwargs=None)``. The teacher is frozen, in eval mode,
            sees the same (mixed) batch, and is kept out of the optimizer and the checkpoint.
            loss = (1 - alpha) * base + alpha * (CE to the teacher's argmax | tau² · KL).
        data_preprocessor: config or module; mean/std default to the model's timm data config.
    """

    def __init__(self, model_name: str, pretrained: bool = False, num_classes: int = 1000,
                 label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 switch_prob: float = 0.5, mix_prob: float = 1.0, grad_checkpointing: bool = False, model_kwargs: Optional[dict] = None,
                 distillation: Optional[dict] = None, data_preprocessor: Optional[Union[dict, nn.Module]] = None, init_cfg: Optional[dict] = None):
        import zoo  # noqa: F401  (registers zoo models with timm)

        check_model_name(model_name)
        super().__init__(data_preprocessor=build_data_preprocessor(data_preprocessor, "ClsDataPreprocessor"),
                         init_cfg=init_cfg)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        self.model_name = model_name
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.switch_prob = float(switch_prob)
        if not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mix_prob must be in [0, 1], got {mix_prob}")
        self.mix_prob = float(mix_prob)
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                       **(model_kwargs or {}))
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.distillation = self._build_teacher(distillation, num_classes)
        if pretrained:
            # mmengine's BaseModule.init_weights re-initialises children lacking this flag
            # (open-mmlab/mmengine#1335), which would wipe the weights just loaded.
            self.model.is_init = True
        pp = self.data_preprocessor
        if isinstance(pp, ClsDataPreprocessor) and not pp.has_normalization:
            dcfg = resolve_data_config({}, model=self.model)
            pp.set_normalization(dcfg["mean"], dcfg["std"])

    def _build_teacher(self, cfg: Optional[dict], num_classes: int) -> Optional[dict]:
        if not cfg:
            return None
        cfg = dict(cfg)
        known = {"teacher", "type", "alpha", "tau", "pretrained", "teacher_kwargs"}
        if "teacher" not in cfg or set(cfg) - known:
            raise ValueError(f"distillation needs a 'teacher' name and accepts only {sorted(known)}; got {sorted(cfg)}")
        if cfg.setdefault("type", "hard") not in ("hard", "soft"):
            raise ValueError(f"distillation type must be 'hard' or 'soft', got {cfg['type']!r}")
        check_model_name(cfg["teacher"])
        teacher = timm.create_model(cfg["teacher"], pretrained=cfg.get("pretrained", True), num_classes=num_classes,
                                    **(cfg.get("teacher_kwargs") or {}))
        teacher.eval().requires_grad_(False)
        # stored outside the module tree: not trained, not saved, not wrapped by DDP
        self.__dict__["_teacher"] = teacher
        return dict(type=cfg["type"], alpha=float(cfg.get("alpha", 0.5)), tau=float(cfg.get("tau", 1.0)))

    def _distill_loss(self, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        teacher = self.__dict__["_teacher"]
        if next(teacher.parameters()).device != inputs.device:
            teacher.to(inputs.device)
        with torch.no_grad():
            t = teacher(inputs).float()
        if self.distillation["type"] == "hard":
            return F.cross_entropy(logits.float(), t.argmax(dim=-1))
        tau = self.distillation["tau"]
        return F.kl_div(F.log_softmax(logits.float() / tau, -1), F.log_softmax(t / tau, -1),
                        reduction="batchmean", log_target=True) * tau * tau

    # -- forward modes -------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, data_samples: Optional[List[BaseDataElement]] = None,
                mode: str = "tensor"):
        if mode == "tensor":
            return self.model(inputs)
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")

    def _mix(self, inputs: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix against the batch rolled by one (works for any batch size >= 2)."""
        use_mixup, use_cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if inputs.shape[0] < 2 or not (use_mixup or use_cutmix):
            return inputs, target
        if self.mix_prob < 1.0 and np.random.rand() >= self.mix_prob:
            return inputs, target
        if use_mixup and use_cutmix:
            use_cutmix = bool(np.random.rand() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(np.random.beta(alpha, alpha))
        other = inputs.roll(1, dims=0)
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(inputs.shape, lam, correct_lam=True)
            inputs = inputs.clone()
            inputs[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
        else:
            inputs = inputs * lam + other * (1.0 - lam)
        return inputs, target * lam + target.roll(1, dims=0) * (1.0 - lam)

    def loss(self, inputs: torch.Tensor, data_samples: List[BaseDataElement]) -> Dict[str, torch.Tensor]:
        labels = gt_labels(data_samples, inputs.device)
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            off = self.label_smoothing / self.num_classes
            target = torch.full((labels.shape[0], self.num_classes), off, device=inputs.device)
            target.scatter_(1, labels[:, None], 1.0 - self.label_smoothing + off)
            inputs, target = self._mix(inputs, target)
            logits = self.model(inputs)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self.model(inputs)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        if self.distillation is not None:
            alpha = self.distillation["alpha"]
            loss = (1 - alpha) * loss + alpha * self._distill_loss(inputs, logits)
        return dict(loss=loss)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, data_samples: Optional[List[BaseDataElement]] = None
                ) -> List[BaseDataElement]:
        scores = self.model(inputs).float().softmax(dim=-1)
        labels = scores.argmax(dim=-1)
        if data_samples is None:
            data_samples = [BaseDataElement() for _ in range(scores.shape[0])]
        for ds, s, l in zip(data_samples, scores, labels):
            ds.set_field(s, "pred_score")
            ds.set_field(l, "pred_label")
        return data_samples
