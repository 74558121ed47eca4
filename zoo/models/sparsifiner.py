"""Sparsifiner: instance-dependent sparse attention for ViTs.

Wei, Duke, Jiang, Aarabi, Taylor, Shkurti, "Sparsifiner: Learning Sparse Instance-Dependent
Attention for Efficient Vision Transformers", CVPR 2023 (arXiv 2303.13755); upstream
lim142857/Sparsifiner.

A DeiT ViT whose every attention layer carries a *connectivity predictor*
(`zoo.layers.connectivity`): from the layer's own q, k it builds a low-rank approximation of the
attention rows, keeps the top ceil(keep_rate * N) keys per query (cls row dense) and runs the real
attention on those keys only, through `zoo.kernels.attention` (`key_lists` layout: on CPU the logits
are computed only at kept pairs; the Triton kernel takes them as a block-sparse element mask).

The network is timm's `VisionTransformer` with the attention module swapped, so the parameter
names are timm's and `deit_*_patch16_224` weights load as they are; the predictors add
`blocks.i.attn.mask_predictor.*` (upstream names).

Modes (`set_attn_mode`), one per phase of the recipe:
  'sparse' (default): predicted mask, sparse attention, predictors frozen (phase 2 / inference).
  'recon': dense attention, predictors trainable, `forward_aux` returns their approximations and
           the dense attention rows to reconstruct (phase 1).
  'dense': the plain DeiT (teacher).

Fixes against upstream: the attention budget is computed per call, never written back to the
module (upstream overwrites `attn_budget` in forward and it shrinks for good); the token
projections are resampled to the actual token count (upstream is fixed to N = 197 / 224 px).
LV-ViT variant and DynamicViT-style token pruning are not implemented.
"""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_function
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter_fn

from zoo import hub
from zoo.kernels import Layout, attention
from zoo.layers.connectivity import ConnectivityPredictor, keep_count, resample_token_proj, topk_connectivity

__all__ = ["Sparsifiner", "SparsifinerAttention", "checkpoint_filter_fn", "ATTN_MODES"]

ATTN_MODES = ("sparse", "recon", "dense")


@register_notrace_function
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, connectivity: Optional[Layout],
                     scale: float) -> torch.Tensor:
    """Attention restricted to the connectivity layout (`topk_connectivity`); None = dense."""
    return attention(q, k, v, connectivity, scale=scale)


@register_notrace_function
def attention_rows(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention probabilities (B, H, N, N), computed by the kernel with v = identity."""
    N = k.shape[2]
    eye = torch.eye(N, dtype=q.dtype, device=q.device).expand(q.shape[0], q.shape[1], N, N)
    return attention(q, k, eye, scale=scale)


class SparsifinerAttention(Attention):
    """timm `Attention` (same parameters) + a connectivity predictor that sparsifies it."""

    def __init__(self, dim: int, num_heads: int = 8, *, grid_size: Tuple[int, int] = (14, 14),
                 num_prefix_tokens: int = 1, keep_rate: float = 0.25, reduce_c_factor: int = 2,
                 reduce_n_factor: int = 6, basis_threshold: float = 0.02, coef_topk: int = 8,
                 attn_drop: float = 0.0, **kwargs):
        if attn_drop:
            raise ValueError(f"attn_drop={attn_drop}: zoo.kernels.attention has no attention dropout; use 0")
        if kwargs.get("gated"):
            raise ValueError("gated attention is not supported by SparsifinerAttention")
        super().__init__(dim, num_heads=num_heads, attn_drop=0.0, **kwargs)
        keep_count(keep_rate, 2)   # validates the range
        self.keep_rate = float(keep_rate)
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_mode = "sparse"
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        self.mask_predictor = ConnectivityPredictor(
            self.head_dim, num_heads, grid_size, num_prefix_tokens=num_prefix_tokens,
            reduce_c_factor=reduce_c_factor, reduce_n_factor=reduce_n_factor,
            basis_threshold=basis_threshold, coef_topk=coef_topk, **dd)

    def _qkv(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _out(self, o):
        B, _, N, _ = o.shape
        o = o.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(o)))

    def predict_connectivity(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, Optional[Layout]]:
        """-> (approx attention (B, H, N-P, N), key-lists layout, or None when it keeps every key)."""
        approx = self.mask_predictor(q, k)
        return approx, topk_connectivity(approx, self.keep_rate, self.num_prefix_tokens, none_if_dense=True)

    def forward_aux(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Forward that also returns what the training losses need (see the module docstring)."""
        q, k, v = self._qkv(x)
        aux: Dict[str, torch.Tensor] = {}
        if self.attn_mode == "sparse":
            approx, conn = self.predict_connectivity(q, k)
            o = sparse_attention(q, k, v, conn, self.scale)
            aux.update(approx_attn=approx, connectivity=conn)
        else:
            o = sparse_attention(q, k, v, None, self.scale)
            if self.attn_mode == "recon":
                aux["approx_attn"] = self.mask_predictor(q, k, recon=True)
                with torch.no_grad():
                    aux["attn"] = attention_rows(q.detach(), k.detach(), self.scale)[:, :, self.num_prefix_tokens:]
        return self._out(o), aux

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if isinstance(attn_mask, torch.Tensor) or (isinstance(is_causal, bool) and is_causal):   # fx: proxies
            raise ValueError("SparsifinerAttention builds its own mask; attn_mask / is_causal are not accepted")
        q, k, v = self._qkv(x)
        conn = None
        if self.attn_mode == "sparse":
            conn = self.predict_connectivity(q, k)[1]
        return self._out(sparse_attention(q, k, v, conn, self.scale))


class Sparsifiner(VisionTransformer):
    """timm `VisionTransformer` with `SparsifinerAttention` in every block.

    Args (beyond timm's VisionTransformer):
        keep_rate: fraction of keys each non-cls query attends (upstream ATTN_KEEP_RATE 0.25).
        reduce_c_factor, reduce_n_factor: predictor channel / token reduction (2, 6 -> 64->32, 197->32).
        basis_threshold: |basis| values at or below it are zeroed (0.02).
        coef_topk: basis coefficients kept per row (8).
        predictor_rank: low-rank size n (default: tokens at img_size // reduce_n_factor; pass 32 to
            load 224-px DeiT-S predictors into a model built at another size).
    """

    def __init__(self, img_size=224, patch_size=16, keep_rate: float = 0.25, reduce_c_factor: int = 2,
                 reduce_n_factor: int = 6, basis_threshold: float = 0.02, coef_topk: int = 8,
                 predictor_rank: Optional[int] = None, dynamic_img_size: bool = True, **kwargs):
        for bad in ("attn_layer", "block_fn", "reg_tokens", "no_embed_class"):
            if kwargs.get(bad):
                raise ValueError(f"Sparsifiner does not accept {bad}={kwargs[bad]!r}")
        if not kwargs.get("class_token", True):
            raise ValueError("Sparsifiner needs the class token (its query row stays dense)")
        # timm instantiates attn_layer itself (it must be a class): build with the class, then give
        # each layer the predictor configured for this model
        super().__init__(img_size=img_size, patch_size=patch_size, attn_layer=SparsifinerAttention,
                         dynamic_img_size=dynamic_img_size, **kwargs)
        keep_count(keep_rate, 2)
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        for a in self.attn_modules():
            a.keep_rate = float(keep_rate)
            a.mask_predictor = ConnectivityPredictor(
                a.head_dim, a.num_heads, tuple(self.patch_embed.grid_size), num_prefix_tokens=self.num_prefix_tokens,
                reduce_c_factor=reduce_c_factor, reduce_n_factor=reduce_n_factor,
                basis_threshold=basis_threshold, coef_topk=coef_topk, rank=predictor_rank, **dd)
        self.set_attn_mode("sparse")

    # -- sparsity controls ---------------------------------------------------------------------
    def attn_modules(self) -> List[SparsifinerAttention]:
        return [b.attn for b in self.blocks]

    def predictors(self) -> List[ConnectivityPredictor]:
        return [a.mask_predictor for a in self.attn_modules()]

    def set_keep_rate(self, keep_rate: float) -> None:
        keep_count(keep_rate, 2)
        for a in self.attn_modules():
            a.keep_rate = float(keep_rate)

    def set_attn_mode(self, mode: str) -> None:
        """'sparse' | 'recon' | 'dense'; predictors are trainable in 'recon' only (phase 1)."""
        if mode not in ATTN_MODES:
            raise ValueError(f"attention mode must be one of {ATTN_MODES}, got {mode!r}")
        for a in self.attn_modules():
            a.attn_mode = mode
            a.mask_predictor.requires_grad_(mode == "recon")
        self.attn_mode = mode

    def forward_aux(self, x: torch.Tensor) -> Dict[str, Any]:
        """logits, final tokens and per-layer predictor outputs (approx_attn, connectivity or attn)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        layers = []
        for blk in self.blocks:
            o, aux = blk.attn.forward_aux(blk.norm1(x))
            x = x + blk.drop_path1(blk.ls1(o))
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            layers.append(aux)
        x = self.norm(x)
        return dict(logits=self.forward_head(x), tokens=x, layers=layers)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Sparsifiner) -> Dict[str, torch.Tensor]:
    """DeiT / timm ViT or upstream Sparsifiner checkpoints -> this model.

    Plain ViT checkpoints keep the model's freshly initialised predictors (to be trained in
    phase 1); upstream predictor token projections are resampled to the model's token count.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    pred = {k: v for k, v in state_dict.items() if ".mask_predictor." in k}
    out = _vit_filter_fn({k: v for k, v in state_dict.items() if k not in pred}, model)
    own = model.state_dict()
    for k, v in pred.items():
        if k not in own:
            continue
        if k.endswith(("proj_n", "proj_back_n")) and v.shape != own[k].shape:
            p = model.num_prefix_tokens
            g = int(round(math.sqrt(v.shape[0] - p)))
            v = resample_token_proj(v, own[k].shape[0], p, (g, g), model.patch_embed.grid_size,
                                    rescale=k.endswith("proj_n"))
            if v.shape[1] != own[k].shape[1]:
                raise ValueError(f"{k}: checkpoint rank {v.shape[1]} != model rank {own[k].shape[1]} "
                                 "(build the model with predictor_rank=" f"{v.shape[1]})")
        out[k] = v
    for k, v in own.items():
        if ".mask_predictor." in k and k not in out:
            out[k] = v
    return out


def _create_sparsifiner(variant: str, pretrained: bool = False, **kwargs) -> Sparsifiner:
    out_indices = kwargs.pop("out_indices", 3)
    feature_cfg = dict(feature_cls="getter", out_indices=out_indices)
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return hub.build_model(Sparsifiner, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           feature_cfg=feature_cfg, **kwargs)


def _cfg(url: str = "", sha256: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    base = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875, interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
        fixed_input_size=False, min_input_size=(3, 32, 32), license="apache-2.0",
        paper_ids="arXiv:2303.13755",
        paper_name="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
        origin_url="https://github.com/lim142857/Sparsifiner",
    )
    base.update(kwargs)
    return hub.cfg(url=url, sha256=sha256, **base)


_DEIT_NOTE = ("backbone only: DeiT ImageNet-1k weights; the connectivity predictors start untrained "
              "(upstream released no Sparsifiner weights), train them with configs/sparsifiner phase 1")

default_cfgs = generate_default_cfgs({
    "sparsifiner_deit_small_patch16_224.deit_in1k": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
        hf_hub_id="timm/deit_small_patch16_224.fb_in1k", notes=(_DEIT_NOTE,)),
    "sparsifiner_deit_tiny_patch16_224.deit_in1k": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
        hf_hub_id="timm/deit_tiny_patch16_224.fb_in1k", notes=(_DEIT_NOTE,)),
})


@register_model
def sparsifiner_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-S (d 384, depth 12, 6 heads), keep rate 0.25, predictor rank N/6."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_sparsifiner("sparsifiner_deit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def sparsifiner_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-Ti (d 192, depth 12, 3 heads); the small-scale / digits variant."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_sparsifiner("sparsifiner_deit_tiny_patch16_224", pretrained, **dict(args, **kwargs))
