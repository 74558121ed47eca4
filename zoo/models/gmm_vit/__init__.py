# SPDX-License-Identifier: Apache-2.0
# Architecture from CatworldLee/Gaussian-Mixture-Mask-Attention (no licence; re-implemented from the paper); see THIRD_PARTY_NOTICES.md
"""Gaussian-mixture-masked attention on five small-dataset ViT hosts (ViT, Swin, CaiT, PiT, T2T).

"Toward a Deeper Understanding: RetNet Viewed through Convolution" (Li & Zhang, arXiv 2309.05375):
each attention layer multiplies its scaled logits by a per-head mixture of K isotropic Gaussians of
the 2-D patch offset, ``sum_k alpha[h,k] exp(-|dp|^2 / 2(sigma[h,k]^2 + 1e-5))``, learned end to end
(see zoo/layers/gmm_attention.py). The hosts are the reference's CIFAR / Tiny-ImageNet configs
(lucidrains-style small-data ViTs), each registered with and without the mixture:

=========  =============================  ==========================  ==========================
host       GMM / baseline (32 px)         GMM / baseline (64 px)      where the mixture acts
=========  =============================  ==========================  ==========================
ViT        gmm_vit_tiny_p4_32             gmm_vit_tiny_p8_64          every layer; GMM models
           vit_tiny_p4_32_gmmbase         vit_tiny_p8_64_gmmbase      drop the cls token
Swin       gmm_swin_tiny_p2_32 / ...      gmm_swin_tiny_p4_64         window tokens, before the
                                                                      shifted-window mask
CaiT       gmm_cait_tiny_p4_32 / ...      gmm_cait_tiny_p8_64         patch self-attention only,
                                                                      before talking heads
PiT        gmm_pit_tiny_p2_32 / ...       gmm_pit_tiny_p4_64          patch-patch block (cls
                                                                      token unmodulated)
T2T        gmm_t2t_vit_32 / ...           gmm_t2t_vit_64              T2T token layers and the
                                                                      main encoder
=========  =============================  ==========================  ==========================

Every attention runs in ``zoo.kernels.attention``. The mixture is a ``GaussianMixture`` score mod
(no (N, N) tensor, grid from the actual input); CaiT's talking heads are the op's ``head_mix``
(``TalkingHeads``: logits mixed across heads before the softmax, probabilities after it).

One host per file (``vit_host``, ``swin_host``, ``cait_host``, ``pit_host``, ``t2t_host``) on the
shared plumbing of ``_host``; the entry points are registered here, so the family is ``gmm_vit``.

No weights were released upstream; ``checkpoint_filter_fn`` maps state dicts of the reference
code (CatworldLee/Gaussian-Mixture-Mask-Attention) for each host onto these modules and drops its
stored copies of fixed tables (distance mask, shift masks, index tables, sinusoid positions).
"""
from typing import Dict

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from zoo import hub
from zoo.models._builder import build_model

from . import cait_host, pit_host, swin_host, t2t_host, vit_host
from .cait_host import GmmCaiT, TalkingHeadsAttention
from .pit_host import GmmPiT
from .swin_host import GmmSwin, ShiftedWindowAttention
from .t2t_host import GmmT2T
from .vit_host import GmmViT

__all__ = ["GmmViT", "GmmSwin", "GmmCaiT", "GmmPiT", "GmmT2T", "checkpoint_filter_fn",
           "ShiftedWindowAttention", "TalkingHeadsAttention"]


# ----------------------------------------------------------------------------------------------
# reference checkpoints -> these modules

# host -> (a key only the reference layout has, its mapping)
_REFERENCE_LAYOUTS = {
    GmmViT: ("to_patch_embedding.1.weight", vit_host.reference_filter),
    GmmCaiT: ("to_patch_embedding.1.weight", cait_host.reference_filter),
    GmmPiT: ("to_patch_embedding.0.weight", pit_host.reference_filter),
    GmmSwin: ("absolute_pos_embed", swin_host.reference_filter),
    GmmT2T: ("tokens_to_token.attention1.attn.qkv.weight", t2t_host.reference_filter),
}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dicts of the reference code (models/{vit,swin,cait,pit,t2t}.py, bare or saved by its
    main.py under ``model_state_dict``) -> the matching host, key by key; a reference key the
    mapping does not know is an error. Our own state dicts pass through unchanged."""
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    for cls, (marker, filter_fn) in _REFERENCE_LAYOUTS.items():
        if isinstance(model, cls):
            return filter_fn(state_dict, model) if marker in state_dict else state_dict
    hosts = ", ".join(c.__name__ for c in _REFERENCE_LAYOUTS)
    raise TypeError(f"checkpoint_filter_fn: expected a gmm_vit host ({hosts}), got {type(model).__name__}")


# ----------------------------------------------------------------------------------------------
# pretrained cfgs and entry points

_ORIGIN = "https://github.com/CatworldLee/Gaussian-Mixture-Mask-Attention"
_CIFAR100 = dict(mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
_TINY_IN = dict(mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821))


def _cfg(size: int = 32, classifier: str = "head", pool_size=None, first_conv: str = "patch_embed.proj", **kwargs):
    stats = _CIFAR100 if size == 32 else _TINY_IN
    return hub.cfg(
        url="", num_classes=100 if size == 32 else 200, input_size=(3, size, size), pool_size=pool_size,
        crop_pct=1.0, interpolation="bicubic", fixed_input_size=False, first_conv=first_conv,
        classifier=classifier, license="none (upstream repository has no licence; no weights released)",
        paper_ids="arXiv:2309.05375", paper_name="Toward a Deeper Understanding: RetNet Viewed through Convolution",
        origin_url=_ORIGIN, **stats, **kwargs)


_T2T = dict(first_conv="tokens_to_token.token_layers.0.attn.qkv")
default_cfgs = generate_default_cfgs({
    **{f"{n}": _cfg(32) for n in ("gmm_vit_tiny_p4_32", "vit_tiny_p4_32_gmmbase", "gmm_cait_tiny_p4_32",
                                  "cait_tiny_p4_32_gmmbase", "gmm_pit_tiny_p2_32", "pit_tiny_p2_32_gmmbase")},
    **{f"{n}": _cfg(64) for n in ("gmm_vit_tiny_p8_64", "vit_tiny_p8_64_gmmbase", "gmm_cait_tiny_p8_64",
                                  "cait_tiny_p8_64_gmmbase", "gmm_pit_tiny_p4_64", "pit_tiny_p4_64_gmmbase")},
    "gmm_swin_tiny_p2_32": _cfg(32, "head.fc", (4, 4)),
    "swin_tiny_p2_32_gmmbase": _cfg(32, "head.fc", (4, 4)),
    "gmm_swin_tiny_p4_64": _cfg(64, "head.fc", (4, 4)),
    "swin_tiny_p4_64_gmmbase": _cfg(64, "head.fc", (4, 4)),
    "gmm_t2t_vit_32": _cfg(32, **_T2T),
    "t2t_vit_32_gmmbase": _cfg(32, **_T2T),
    "gmm_t2t_vit_64": _cfg(64, **_T2T),
    "t2t_vit_64_gmmbase": _cfg(64, **_T2T),
})


def _create(cls, variant: str, pretrained: bool = False, **kwargs):
    # every stage / block by default, so features_only matches feature_info
    n = len(kwargs["depths"]) if "depths" in kwargs else kwargs["depth"]
    feature_cfg = dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", tuple(range(n))))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return build_model(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                       feature_cfg=feature_cfg, **kwargs)


_VIT = dict(embed_dim=192, depth=9, num_heads=12, head_dim=16, mlp_ratio=2.)
_SWIN = dict(embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12), window_size=4, mlp_ratio=2.)
_CAIT = dict(embed_dim=108, depth=24, depth_token_only=2, num_heads=4, head_dim=64, mlp_hidden=384)
_PIT = dict(embed_dim=96, depths=(2, 6, 4), num_heads=(2, 4, 8), mlp_ratio=2.)
_T2T_ARGS = dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2., token_dim=64)


def _variant(cls, base: dict, size: int, gmm: bool, **fixed):
    def fn(variant, pretrained=False, **kwargs):
        args = dict(base, img_size=size, num_kernels=5 if gmm else 0, num_classes=100 if size == 32 else 200, **fixed)
        if not gmm:
            for k in ("num_kernels", "gmm_mode"):
                if kwargs.get(k):
                    raise ValueError(f"{variant} is the baseline without the mixture; use the gmm_ model for {k}")
        return _create(cls, variant, pretrained, **dict(args, **kwargs))
    return fn


@register_model
def gmm_vit_tiny_p4_32(pretrained: bool = False, **kwargs) -> GmmViT:
    """GMM-ViT for 32 px (CIFAR / SVHN): patch 4, 9 x 192, 12 heads; no cls token, mean pool."""
    return _variant(GmmViT, _VIT, 32, True, patch_size=4)("gmm_vit_tiny_p4_32", pretrained, **kwargs)


@register_model
def vit_tiny_p4_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmViT:
    """The reference's baseline ViT for 32 px (cls token), the GMM-ViT comparison point."""
    return _variant(GmmViT, _VIT, 32, False, patch_size=4)("vit_tiny_p4_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_vit_tiny_p8_64(pretrained: bool = False, **kwargs) -> GmmViT:
    """GMM-ViT for 64 px (Tiny-ImageNet): patch 8."""
    return _variant(GmmViT, _VIT, 64, True, patch_size=8)("gmm_vit_tiny_p8_64", pretrained, **kwargs)


@register_model
def vit_tiny_p8_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmViT:
    """Baseline ViT for 64 px (Tiny-ImageNet): patch 8, cls token."""
    return _variant(GmmViT, _VIT, 64, False, patch_size=8)("vit_tiny_p8_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_swin_tiny_p2_32(pretrained: bool = False, **kwargs) -> GmmSwin:
    """GMM-Swin for 32 px: patch 2, window 4, mixture over each window's 4x4 tokens."""
    return _variant(GmmSwin, _SWIN, 32, True, patch_size=2)("gmm_swin_tiny_p2_32", pretrained, **kwargs)


@register_model
def swin_tiny_p2_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmSwin:
    """Baseline small-data Swin for 32 px."""
    return _variant(GmmSwin, _SWIN, 32, False, patch_size=2)("swin_tiny_p2_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_swin_tiny_p4_64(pretrained: bool = False, **kwargs) -> GmmSwin:
    """GMM-Swin for 64 px: patch 4."""
    return _variant(GmmSwin, _SWIN, 64, True, patch_size=4)("gmm_swin_tiny_p4_64", pretrained, **kwargs)


@register_model
def swin_tiny_p4_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmSwin:
    """Baseline small-data Swin for 64 px."""
    return _variant(GmmSwin, _SWIN, 64, False, patch_size=4)("swin_tiny_p4_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_cait_tiny_p4_32(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """GMM-CaiT (the reference's cait-tiny) for 32 px: patch 4, 24 + 2 layers of width 108."""
    return _variant(GmmCaiT, _CAIT, 32, True, patch_size=4)("gmm_cait_tiny_p4_32", pretrained, **kwargs)


@register_model
def cait_tiny_p4_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """Baseline cait-tiny for 32 px."""
    return _variant(GmmCaiT, _CAIT, 32, False, patch_size=4)("cait_tiny_p4_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_cait_tiny_p8_64(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """GMM-CaiT for 64 px: patch 8."""
    return _variant(GmmCaiT, _CAIT, 64, True, patch_size=8)("gmm_cait_tiny_p8_64", pretrained, **kwargs)


@register_model
def cait_tiny_p8_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """Baseline cait-tiny for 64 px."""
    return _variant(GmmCaiT, _CAIT, 64, False, patch_size=8)("cait_tiny_p8_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_pit_tiny_p2_32(pretrained: bool = False, **kwargs) -> GmmPiT:
    """GMM-PiT for 32 px: patch 2, channels 96-192-384, heads 2-4-8 of width 48."""
    return _variant(GmmPiT, _PIT, 32, True, patch_size=2)("gmm_pit_tiny_p2_32", pretrained, **kwargs)


@register_model
def pit_tiny_p2_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmPiT:
    """Baseline small-data PiT for 32 px."""
    return _variant(GmmPiT, _PIT, 32, False, patch_size=2)("pit_tiny_p2_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_pit_tiny_p4_64(pretrained: bool = False, **kwargs) -> GmmPiT:
    """GMM-PiT for 64 px: patch 4."""
    return _variant(GmmPiT, _PIT, 64, True, patch_size=4)("gmm_pit_tiny_p4_64", pretrained, **kwargs)


@register_model
def pit_tiny_p4_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmPiT:
    """Baseline small-data PiT for 64 px."""
    return _variant(GmmPiT, _PIT, 64, False, patch_size=4)("pit_tiny_p4_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_t2t_vit_32(pretrained: bool = False, **kwargs) -> GmmT2T:
    """GMM-T2T-ViT for 32 px: one token layer (16x16), 8x8 tokens, 12 x 256."""
    return _variant(GmmT2T, _T2T_ARGS, 32, True)("gmm_t2t_vit_32", pretrained, **kwargs)


@register_model
def t2t_vit_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmT2T:
    """Baseline small-data T2T-ViT for 32 px."""
    return _variant(GmmT2T, _T2T_ARGS, 32, False)("t2t_vit_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_t2t_vit_64(pretrained: bool = False, **kwargs) -> GmmT2T:
    """GMM-T2T-ViT for 64 px: two token layers, 8x8 tokens."""
    return _variant(GmmT2T, _T2T_ARGS, 64, True)("gmm_t2t_vit_64", pretrained, **kwargs)


@register_model
def t2t_vit_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmT2T:
    """Baseline small-data T2T-ViT for 64 px."""
    return _variant(GmmT2T, _T2T_ARGS, 64, False)("t2t_vit_64_gmmbase", pretrained, **kwargs)
