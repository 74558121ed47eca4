# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from lim142857/Sparsifiner (MIT; Copyright (c) 2023 Cong Wei); see THIRD_PARTY_NOTICES.md
"""mmengine wrapper for the two-phase Sparsifiner recipe (zoo/models/sparsifiner.py).

phase='dense' (teacher pre-training for small runs): plain DeiT, dense attention, CE only.
phase='predictor' (phase 1): backbone frozen, attention dense, only the connectivity predictors
    learn, by reconstructing each layer's dense attention rows (the teacher's: with the backbone
    frozen at the teacher's weights the model's own dense attention *is* the teacher's).
    loss = recon_weight * sum over layers/heads/rows/keys of (approx - attn)^2, averaged over the batch.
phase='backbone' (phase 2): predictors frozen, sparse attention, the backbone learns.
    loss = CE + kd_weight * KL(teacher || student logits) + token_weight * MSE(final tokens).
    The teacher is a frozen dense copy: of `teacher_model_name` (+ `teacher_checkpoint`) when
    given, else of the student as it stands at the first training step (i.e. after `load_from`).
    LV-ViT students and teachers (`cls_logits` / `aux_logits` in `forward_aux`) are distilled as
    upstream does: CE and KL on the class-token head alone, the token MSE on the aux head's
    per-token logits. With token pruning on, the teacher's tokens are taken at the student's kept
    positions (`token_index`), as upstream restricts the MSE to unpruned tokens.
"""
import copy
from typing import Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

from zoo.engine import TimmClassifier, gt_labels
from zoo.registry import MODELS

__all__ = ["SparsifinerClassifier"]

PHASES = ("dense", "predictor", "backbone")


@MODELS.register_module()
class SparsifinerClassifier(TimmClassifier):
    """TimmClassifier for a `sparsifiner_*` model with the recipe's phase losses.

    Args (beyond TimmClassifier's):
        phase: 'dense' (teacher), 'predictor' (phase 1) or 'backbone' (phase 2).
        keep_rate: attention keep rate of the student (None: the model's).
        recon_weight: phase-1 reconstruction weight (0.01).
        kd_weight, token_weight: phase-2 distillation weights (0.5, 0.5).
        teacher_model_name, teacher_checkpoint, teacher_pretrained, teacher_kwargs: explicit dense
            teacher for phase 2 (its pretrained weights unless a checkpoint is given); default is
            a frozen dense copy of the student at the first training step.
    """

    def __init__(self, model_name: str, phase: str = "backbone", keep_rate: Optional[float] = None,
                 recon_weight: float = 0.01, kd_weight: float = 0.5, token_weight: float = 0.5,
                 teacher_model_name: Optional[str] = None, teacher_checkpoint: Optional[str] = None,
                 teacher_pretrained: bool = True, teacher_kwargs: Optional[dict] = None, **kwargs):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        super().__init__(model_name, **kwargs)
        if not hasattr(self.model, "set_attn_mode"):
            raise ValueError(f"{model_name!r} is not a Sparsifiner model (no set_attn_mode); "
                             "use a sparsifiner_* model name")
        if kwargs.get("mixup_alpha") or kwargs.get("cutmix_alpha"):
            raise ValueError("SparsifinerClassifier does not mix inputs (the distillation targets are per image)")
        self.phase = phase
        self.recon_weight, self.kd_weight, self.token_weight = float(recon_weight), float(kd_weight), float(token_weight)
        if keep_rate is not None:
            self.model.set_keep_rate(keep_rate)
        self._teacher: List[torch.nn.Module] = []      # kept out of state_dict / parameters()
        if phase == "dense":
            self.model.set_attn_mode("dense")
        elif phase == "predictor":
            self.model.set_attn_mode("recon")
            for n, p in self.model.named_parameters():
                p.requires_grad_(".mask_predictor." in n)
        else:
            self.model.set_attn_mode("sparse")          # also freezes the predictors
            if teacher_model_name is not None:
                t = timm.create_model(teacher_model_name, num_classes=self.num_classes,
                                      pretrained=teacher_pretrained and not teacher_checkpoint,
                                      checkpoint_path=teacher_checkpoint or "", **(teacher_kwargs or {}))
                self._set_teacher(t)

    def _set_teacher(self, t: torch.nn.Module) -> None:
        t = t.eval().requires_grad_(False)
        if hasattr(t, "set_attn_mode"):
            t.set_attn_mode("dense")
            t.requires_grad_(False)
        self._teacher[:] = [t]

    @property
    def teacher(self) -> torch.nn.Module:
        if not self._teacher:
            self._set_teacher(copy.deepcopy(self.model))
        t = self._teacher[0]
        p = next(self.model.parameters())
        if next(t.parameters()).device != p.device:
            t.to(p.device)
        return t

    def train(self, mode: bool = True):
        super().train(mode)
        if self.phase == "predictor":
            self.model.eval()      # frozen backbone: no dropout / drop-path while reconstructing
        return self

    def loss(self, inputs: torch.Tensor, data_samples) -> Dict[str, torch.Tensor]:
        if self.phase == "dense":
            return super().loss(inputs, data_samples)
        labels = gt_labels(data_samples, inputs.device)
        if self.phase == "predictor":
            out = self.model.forward_aux(inputs)
            rec = sum(((l["approx_attn"].float() - l["attn"].float()) ** 2).sum() for l in out["layers"])
            return dict(loss_recon=self.recon_weight * rec / inputs.shape[0])
        teacher = self.teacher
        with torch.no_grad():
            t = teacher.forward_aux(inputs) if hasattr(teacher, "forward_aux") else None
            t_logits = t["logits"] if t is not None else teacher(inputs)
            t_tokens = t["tokens"] if t is not None else teacher.forward_features(inputs)
        out = self.model.forward_aux(inputs)
        logits, tokens, prefix = out["logits"], out["tokens"], getattr(self.model, "num_prefix_tokens", 1)
        if t is not None and "aux_logits" in out and "aux_logits" in t:     # LV-ViT: upstream's views
            logits, tokens, t_logits, t_tokens, prefix = out["cls_logits"], out["aux_logits"], t["cls_logits"], \
                t["aux_logits"], 0
        if "token_index" in out:
            t_tokens = _gather_tokens(t_tokens, out["token_index"], prefix)
        logits = logits.float()
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        kd = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits.float(), -1), reduction="batchmean",
                      log_target=True)
        tok = F.mse_loss(tokens.float(), t_tokens.float())
        return dict(loss_cls=ce, loss_kd=self.kd_weight * kd, loss_token=self.token_weight * tok)


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor, prefix: int) -> torch.Tensor:
    """Prefix tokens + the patch tokens at `index` (B, N') of an unpruned (B, P + N, C) sequence."""
    patches = tokens[:, prefix:].gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :prefix], patches], dim=1)
