# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from rayleizhu/BiFormer (MIT; Copyright (c) Meta Platforms, Inc. and affiliates); see THIRD_PARTY_NOTICES.md
"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

Paper: https://arxiv.org/abs/2303.08810 — reference code: https://github.com/rayleizhu/BiFormer (MIT).

A four-stage pyramid. Stages 1–3 use Bi-Level Routing Attention (BRA): the map is split into
7×7 regions, each region picks its top-k related regions from region-mean affinities, then its
tokens attend to the tokens of those regions only. Stage 4 is dense attention with LePE. Every
attention runs through ``zoo.kernels.attention`` (the ``routed_topk`` layout for BRA), so no
k-fold gathered copy of K/V is materialised as in the reference code.

Differences from the reference code, none of which change the numbers at multiples of 224 px:
- any input size: maps are padded to the region grid and padded tokens are masked out of routing
  and attention (upstream asserts sizes, or pads without masking);
- channels-last inside a stage (one permute per stage, not per block);
- timm API: features_only, forward_intermediates, grad checkpointing without fairscale.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import register_model, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from zoo.errors import NotScriptable
from zoo.hub import cfg
from zoo.models._builder import build_model
from zoo.layers.routing_attention import BiLevelRoutingAttention, LePEAttention

__all__ = ["BiFormer"]


class BiFormerBlock(nn.Module):
    """``x + DWConv3x3(x)`` → pre-LN attention → pre-LN MLP, on channels-last maps.

    ``topk > 0`` selects BRA, ``topk == -2`` dense attention with LePE (upstream's encoding).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            topk: int,
            n_win: int = 7,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            cpe: bool = True,
            drop_path: float = 0.,
            proj_drop: float = 0.,
            dense_heads: int = 8,
    ):
        super().__init__()
        # Conditional position encoding (upstream's ``pos_embed``); the STL layout has none.
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv, proj_drop=proj_drop)
        elif topk == -2:
            self.attn = LePEAttention(dim, num_heads=dense_heads, side_dwconv=side_dwconv, proj_drop=proj_drop)
        else:
            raise ValueError(f"topk must be > 0 (routed) or -2 (dense with LePE), got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # NHWC tensor viewed as NCHW (channels_last strides): no copy around the conv.
            x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class BiFormerStage(nn.Module):
    """Downsample (NCHW) then blocks (NHWC); NCHW in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            topk: int,
            downsample: str = "conv",
            n_win: int = 7,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            cpe: bool = True,
            drop_path: Sequence[float] = (),
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample == "conv":  # BiFormer-T/S/B: overlapping conv3x3/s2 + BN
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, dim, 3, 2, 1), nn.BatchNorm2d(dim))
        elif downsample == "patch":  # STL (Swin layout): BN + conv2x2/s2 patch merging
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, 2))
        elif downsample == "none":
            self.downsample = nn.Identity()
        else:
            raise ValueError(f"downsample must be 'conv', 'patch' or 'none', got {downsample!r}")
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.Sequential(*[
            BiFormerBlock(
                dim, num_heads=num_heads, topk=topk, n_win=n_win, mlp_ratio=mlp_ratio,
                side_dwconv=side_dwconv, cpe=cpe, drop_path=drop_path[i], proj_drop=proj_drop)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class BiFormer(NotScriptable, nn.Module):
    """BiFormer backbone + BN → global pool → Linear head."""

    def __init__(
            self,
            depths: Tuple[int, ...] = (2, 2, 8, 2),
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            topks: Tuple[int, ...] = (1, 4, 16, -2),
            head_dim: int = 32,
            n_win: int = 7,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            stem_type: str = "overlap",
            cpe: bool = True,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        """
        Args:
            stem_type: 'overlap' (T/S/B: two conv3x3/s2 with BN, GELU between; conv3x3/s2 + BN
                downsampling) or 'patch' (STL: conv4x4/s4 + BN; BN + conv2x2/s2 downsampling).
            cpe: depth-wise 3x3 conditional position encoding at the start of each block.
            topks: routed regions per stage; -2 = dense attention with LePE (8 heads).
        """
        super().__init__()
        if not (len(depths) == len(embed_dims) == len(topks)):
            raise ValueError("depths, embed_dims and topks must have the same length")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        if stem_type == "overlap":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, embed_dims[0] // 2, 3, 2, 1),
                nn.BatchNorm2d(embed_dims[0] // 2),
                nn.GELU(),
                nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, 2, 1),
                nn.BatchNorm2d(embed_dims[0]),
            )
            downsample = "conv"
        elif stem_type == "patch":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dims[0], 4, 4), nn.BatchNorm2d(embed_dims[0]))
            downsample = "patch"
        else:
            raise ValueError(f"stem_type must be 'overlap' or 'patch', got {stem_type!r}")

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]
        stages = []
        self.feature_info = []
        for i, dim in enumerate(embed_dims):
            stages.append(BiFormerStage(
                embed_dims[i - 1] if i else dim, dim, depths[i],
                num_heads=dim // head_dim, topk=topks[i], downsample=downsample if i else "none",
                n_win=n_win, mlp_ratio=mlp_ratio, side_dwconv=side_dwconv, cpe=cpe,
                drop_path=dpr[i], proj_drop=proj_drop_rate))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        # Upstream normalises the final map with BatchNorm (running stats) before pooling.
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per-stage NCHW maps (strides 4, 8, 16, 32); ``norm`` applies the final BN to the last."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict:
    """Map the official checkpoints (``{'model': ...}``, keys of ``models/biformer.py`` or
    ``models/biformer_stl.py``) onto this implementation. Already-converted dicts pass through."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    if "stem.0.weight" in state_dict:
        return state_dict
    stl = isinstance(model.stem, nn.Sequential) and len(model.stem) == 2
    out = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if parts[0] == "downsample_layers":
            i, rest = int(parts[1]), ".".join(parts[2:])
            k = f"stem.{rest}" if i == 0 else f"stages.{i}.downsample.{rest}"
        elif parts[0] == "stages":
            # T/S/B: stages.i.j.*  STL: stages.i.blocks.j.*
            if parts[2] == "blocks":
                parts = parts[:2] + parts[3:]
            k = ".".join(["stages", parts[1], "blocks", parts[2]] + parts[3:])
            k = k.replace(".attn.qkv.qkv.", ".attn.qkv.").replace(".attn.wo.", ".attn.proj.")
            if stl:
                k = k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.")
            else:
                k = k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
        elif parts[0] == "head":
            k = "head.fc." + ".".join(parts[1:])
        out[k] = v
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    feature_cfg = dict(out_indices=out_indices, flatten_sequential=True)
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return build_model(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(url: str = "", sha256: Optional[str] = None, **kwargs):
    return cfg(
        url=url, sha256=sha256,
        license="mit",
        paper_ids="arXiv:2303.08810",
        paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention",
        origin_url="https://github.com/rayleizhu/BiFormer",
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.875, interpolation="bicubic",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="stem.0", classifier="head.fc",
        **kwargs,
    )


# Official OneDrive share links (README / models/*.py of rayleizhu/BiFormer @1697bbb). Upstream
# publishes no file hashes; several users report the share links as dead (issue #53).
default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content"),
    "biformer_small.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content"),
    "biformer_base.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content"),
    "biformer_stl.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChSf-m7ujkvx9lIQ1/root/content"),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), topks=(1, 4, 16, -2), mlp_ratio=3.)
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), topks=(1, 4, 16, -2), mlp_ratio=3.)
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), topks=(1, 4, 16, -2), mlp_ratio=3.)
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    """Swin-T layout ablation model: patch stem/merging, no CPE, MLP ratio 4."""
    args = dict(
        depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), topks=(1, 4, 16, -2), mlp_ratio=4.,
        stem_type="patch", cpe=False)
    return _create_biformer("biformer_stl", pretrained, **dict(args, **kwargs))
