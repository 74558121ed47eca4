# SPDX-License-Identifier: Apache-2.0
# Derived from huawei-noah/Efficient-AI-Backbones (Apache-2.0; Copyright (C) 2021. Huawei Technologies Co., Ltd); see THIRD_PARTY_NOTICES.md
"""Transformer in Transformer (TNT) and PyramidTNT, with every attention in ``zoo.kernels``.

TNT (Han et al., "Transformer in Transformer", NeurIPS 2021, arXiv:2103.00112): the image is cut
into 16x16 "sentences"; a 7x7 stride-4 conv turns each into 4x4 "words". Every block runs an inner
transformer over the words of each sentence, folds the words into their sentence token (LayerNorm,
bias-free Linear, LayerNorm) and runs an outer transformer over the sentences.

PyramidTNT (Han et al., arXiv:2201.00978): conv stem, four stages that merge 2x2 sentences (and
their words) between stages, outer attention on spatially reduced keys with a learned relative
position bias per stage, and inner transformers only in the first block(s) of a stage.

Parameter names follow the official code (huawei-noah/Efficient-AI-Backbones ``tnt_pytorch``), so
official checkpoints load as they are; :func:`checkpoint_filter_fn` also takes timm's TNT layout.

What this file adds over timm's ``tnt.py``: any input size (the input is padded to whole
sentences, sentence position embeddings and PyramidTNT's relative position biases are resampled
to the actual grid), the inner attention of all B*N sentences as one dense batched call of the op,
no layout copies around the attention, and PyramidTNT.
"""
import math
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, resample_abs_pos_embed, to_2tuple,
                         trunc_normal_)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import checkpoint

from zoo import hub
from zoo.models._builder import build_model
from zoo.errors import NotScriptable, check_batch
from zoo.layers.inplace import gelu_approximate
from zoo.layers.mha import MultiHeadAttention, inference_linear, linear_residual
from zoo.layers.weight_init import init_linear_trunc_normal

__all__ = ["Tnt", "PyramidTnt", "TntBlock", "checkpoint_filter_fn"]

# leaves for plain torch.fx too (timm's tracer already knows them): traced models run these calls
torch.fx.wrap("inference_linear")
torch.fx.wrap("linear_residual")

Grid = Tuple[int, int]


# --------------------------------------------------------------------------------------------------
# helpers

@torch.fx.wrap
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: Grid, min_size: int = 1) -> torch.Tensor:
    """Zero-pad an NCHW image at the bottom / right so both sides are whole multiples."""
    H, W = x.shape[-2:]
    if min(H, W) < min_size:
        raise ValueError(f"input {H}x{W} is too small: this model needs at least {min_size}x{min_size} pixels")
    ph, pw = (-H) % multiple[0], (-W) % multiple[1]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


@torch.fx.wrap
@register_notrace_function
def resample_relative_pos(
        rel_pos: torch.Tensor,
        q_grid: Grid,
        k_grid: Grid,
        old_q_grid: Grid,
        old_k_grid: Grid,
) -> torch.Tensor:
    """Resample a learned (1, H, Lq, Lk) query x key bias to new query / key grids (bicubic).

    Keys are resampled for every query first, then queries for every (new) key; the bias is
    returned unchanged when both grids match, so the trained resolution is bit-exact.
    """
    q_grid, k_grid = tuple(q_grid), tuple(k_grid)
    if q_grid == tuple(old_q_grid) and k_grid == tuple(old_k_grid):
        return rel_pos
    _, nh, nq, nk = rel_pos.shape
    dtype = rel_pos.dtype
    t = rel_pos.float().reshape(1, nh * nq, old_k_grid[0], old_k_grid[1])
    if k_grid != tuple(old_k_grid):
        t = F.interpolate(t, size=k_grid, mode="bicubic", align_corners=False, antialias=True)
    nk = k_grid[0] * k_grid[1]
    t = t.reshape(nh, old_q_grid[0], old_q_grid[1], nk).permute(0, 3, 1, 2).reshape(1, nh * nk, *old_q_grid)
    if q_grid != tuple(old_q_grid):
        t = F.interpolate(t, size=q_grid, mode="bicubic", align_corners=False, antialias=True)
    t = t.reshape(nh, nk, q_grid[0] * q_grid[1]).transpose(1, 2)
    return t.unsqueeze(0).to(dtype)


@torch.fx.wrap
@register_notrace_function
def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw, F) sentence grid -> zero sentences appended to make gh and gw even."""
    gh, gw = x.shape[1], x.shape[2]
    if gh % 2 or gw % 2:
        x = F.pad(x, (0, 0, 0, gw % 2, 0, gh % 2))
    return x


@torch.fx.wrap
@register_notrace_function
def stage_bias(rel_pos: torch.Tensor, grid: Grid, sr_ratio: int, old_grid: Grid, old_key_grid: Grid) -> torch.Tensor:
    """A PyramidTNT stage's learned outer-attention bias for the actual sentence grid."""
    key_grid = (grid[0] // sr_ratio, grid[1] // sr_ratio)
    if key_grid[0] < 1 or key_grid[1] < 1:
        raise ValueError(f"sentence grid {tuple(grid)} is smaller than the key pooling {sr_ratio}x{sr_ratio}; "
                         "use a larger input (PyramidTNT needs at least 32x32 pixels)")
    return resample_relative_pos(rel_pos, grid, key_grid, old_grid, old_key_grid)


def _to_channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) contiguous -> NCHW view in channels-last memory (a conv then keeps that layout)."""
    return x.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------
# blocks

class SrAttention(MultiHeadAttention):
    """Multi-head attention whose keys / values may come from an average-pooled map (PyramidTNT).

    With ``sr_ratio`` > 1 the tokens are pooled ``sr_ratio`` x ``sr_ratio`` (floor, as upstream),
    then Linear + LayerNorm, before the k/v projection. ``bias`` is an additive logit bias
    broadcastable to (B, H, Lq, Lk).
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, norm_layer: Callable = nn.LayerNorm, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            if self.qkv_split != "q_kv":
                raise ValueError(f"sr_ratio={sr_ratio} needs qkv_split='q_kv'")
            self.linear = nn.Linear(dim, dim)
            self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor, grid: Optional[Grid] = None, bias=None, residual=None) -> torch.Tensor:
        kv_input = None
        if self.sr_ratio > 1:
            B, L, C = x.shape
            m = x.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
            m = F.avg_pool2d(m, self.sr_ratio, self.sr_ratio)
            kv_input = self.norm(self.linear(m.flatten(2).transpose(1, 2)))
        return super().forward(x, kv_input=kv_input, bias=bias, residual=residual)


class TntBlock(nn.Module):
    """Inner transformer over the words of each sentence, word -> sentence fold, outer transformer.

    Args:
        dim / inner_dim: sentence and word widths; ``inner_dim=0`` makes an outer-only block
            (PyramidTNT's later blocks in a stage).
        num_words: words per sentence (the fold is a Linear over ``num_words * inner_dim``).
        qkv_split: ``'qk_v'`` (TNT) or ``'q_kv'`` (PyramidTNT), see :class:`MultiHeadAttention`.
        sentence_norm: the inner LayerNorms normalise a whole sentence (``num_words * inner_dim``)
            rather than each word; PyramidTNT's released weights need this.
        sr_ratio: key/value pooling of the outer attention (PyramidTNT).
        num_prefix_tokens: leading outer tokens without words (TNT's class token).
    """

    def __init__(
            self,
            dim: int,
            inner_dim: int,
            num_heads: int,
            inner_num_heads: int,
            num_words: int,
            mlp_ratio: float = 4.,
            inner_mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qkv_split: str = "qk_v",
            sentence_norm: bool = False,
            sr_ratio: int = 1,
            num_prefix_tokens: int = 1,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
    ):
        super().__init__()
        self.has_inner = inner_dim > 0
        self.sentence_norm = sentence_norm
        self.num_prefix_tokens = num_prefix_tokens
        attn = partial(SrAttention, qkv_split=qkv_split, qkv_bias=qkv_bias, attn_drop=attn_drop,
                       proj_drop=proj_drop, norm_layer=norm_layer)
        if self.has_inner:
            inner_norm_dim = num_words * inner_dim if sentence_norm else inner_dim
            self.inner_norm1 = norm_layer(inner_norm_dim)
            self.inner_attn = attn(inner_dim, inner_num_heads)
            self.inner_norm2 = norm_layer(inner_norm_dim)
            self.inner_mlp = Mlp(inner_dim, int(inner_dim * inner_mlp_ratio), act_layer=act_layer, drop=proj_drop)
            self.proj_norm1 = norm_layer(num_words * inner_dim)
            self.proj = nn.Linear(num_words * inner_dim, dim, bias=False)
            self.proj_norm2 = norm_layer(dim)
        self.outer_norm1 = norm_layer(dim)
        self.outer_attn = attn(dim, num_heads, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.outer_norm2 = norm_layer(dim)
        self.outer_mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.has_dropout = drop_path > 0. or proj_drop > 0.

    def _inner_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.sentence_norm:
            return norm(x.flatten(1)).view_as(x)
        return norm(x)

    def forward(
            self,
            inner: Optional[torch.Tensor],
            outer: torch.Tensor,
            grid: Optional[Grid] = None,
            bias: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """inner (B*N, M, c) words, outer (B, p + N, C) sentences on ``grid`` (needed for sr_ratio > 1)."""
        if self.has_inner:
            # all B*N sentences are the batch of one dense attention call
            inner = self._residual(inner, self.inner_attn, self._inner_norm(self.inner_norm1, inner))
            inner = self._residual(inner, self.inner_mlp, self._inner_norm(self.inner_norm2, inner))
            outer = self._fold(inner, outer)
        outer = self._residual(outer, self.outer_attn, self.outer_norm1(outer), grid, bias)
        outer = self._residual(outer, self.outer_mlp, self.outer_norm2(outer))
        return inner, outer

    def _residual(self, x: torch.Tensor, branch: nn.Module, *args) -> torch.Tensor:
        """``x + drop_path(branch(*args))``. Without active dropout the sum runs inside the branch's
        output GEMM (see :func:`zoo.layers.mha.linear_residual`): the same value, one pass less."""
        if self.training and self.has_dropout:
            return x + self.drop_path(branch(*args))
        if isinstance(branch, Mlp):
            return _mlp_residual(branch, args[0], x)
        return branch(*args, residual=x)

    def _fold(self, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
        B, p = outer.shape[0], self.num_prefix_tokens
        fold = self.proj_norm2(inference_linear(
            self.proj_norm1(inner.reshape(B, inner.shape[0] // B, -1)), self.proj.weight, self.proj.bias))
        if p:
            return torch.cat([outer[:, :p], outer[:, p:] + fold], dim=1)
        return outer + fold


def _gelu_kind(act: nn.Module) -> Optional[str]:
    """inference_linear's name for an exact / tanh GELU module, None for anything else."""
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(gelu_approximate(act))


def _mlp_residual(mlp: Mlp, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + mlp(x) for a dropout-free timm Mlp, the sum done by fc2's GEMM; a GELU is fused
    into fc1 (one pass, no second full-size buffer, see inference_linear)."""
    gelu = _gelu_kind(mlp.act)
    if gelu is not None and isinstance(mlp.norm, nn.Identity):
        h = inference_linear(x, mlp.fc1.weight, mlp.fc1.bias, act=gelu)
    else:
        h = mlp.norm(mlp.act(mlp.fc1(x)))
    return linear_residual(h, mlp.fc2, residual)


class WordEmbed(nn.Module):
    """Image -> sentences of words: cut into ``patch_size`` sentences, 7x7 conv inside each.

    The conv pads each sentence separately (zeros at sentence borders), as the official code's
    unfold-then-conv does. The image must already be a whole number of sentences.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, inner_dim: int = 24, inner_stride: int = 4):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.word_grid = tuple(math.ceil(p / inner_stride) for p in self.patch_size)
        self.num_words = self.word_grid[0] * self.word_grid[1]
        self.inner_dim = inner_dim
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, padding=3, stride=inner_stride)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        gh, gw = H // ph, W // pw
        # one copy into (B*N, ph, pw, C); the conv reads it as channels-last and writes
        # channels-last, so the (B*N, words, c) view below is free
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B * gh * gw, ph, pw, C)
        x = self.proj(_to_channels_last_view(x))
        x = x.permute(0, 2, 3, 1).reshape(B * gh * gw, self.num_words, self.inner_dim)
        return x, (gh, gw)


# --------------------------------------------------------------------------------------------------
# TNT

class Tnt(NotScriptable, nn.Module):
    """TNT: inner (word) and outer (sentence) transformers, class-token head."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 384,
            inner_dim: int = 24,
            depth: int = 12,
            num_heads: int = 6,
            inner_num_heads: int = 4,
            mlp_ratio: float = 4.,
            inner_mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            inner_stride: int = 4,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
    ):
        super().__init__()
        if global_pool not in ("", "token", "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; use 'token', 'avg' or ''")
        norm_layer = norm_layer or nn.LayerNorm
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = WordEmbed(patch_size, in_chans, inner_dim, inner_stride)
        img_size = to_2tuple(img_size)
        self.patch_size = self.patch_embed.patch_size
        # grid the sentence position embedding is stored for; other grids resample it
        self.pos_grid = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        num_words = self.patch_embed.num_words

        self.proj_norm1 = norm_layer(num_words * inner_dim)
        self.proj = nn.Linear(num_words * inner_dim, embed_dim)
        self.proj_norm2 = norm_layer(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.outer_pos = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1] + 1, embed_dim))
        self.inner_pos = nn.Parameter(torch.zeros(1, num_words, inner_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            TntBlock(
                embed_dim, inner_dim, num_heads, inner_num_heads, num_words,
                mlp_ratio=mlp_ratio, inner_mlp_ratio=inner_mlp_ratio, qkv_bias=qkv_bias, qkv_split="qk_v",
                num_prefix_tokens=1, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        r = max(self.patch_size)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=r) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.cls_token, std=.02)
        trunc_normal_(self.outer_pos, std=.02)
        trunc_normal_(self.inner_pos, std=.02)
        self.apply(init_linear_trunc_normal)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"outer_pos", "inner_pos", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^cls_token|^outer_pos|^inner_pos|^patch_embed|^proj",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ValueError(f"global_pool={global_pool!r} is not supported; use 'token', 'avg' or ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Grid]:
        B = x.shape[0]
        x = pad_to_multiple(x, self.patch_size)
        inner, grid = self.patch_embed(x)
        inner = inner + self.inner_pos
        outer = self.proj_norm2(self.proj(self.proj_norm1(inner.reshape(B, grid[0] * grid[1], -1))))
        pos = resample_abs_pos_embed(self.outer_pos, new_size=grid, old_size=self.pos_grid, num_prefix_tokens=1)
        outer = torch.cat([self.cls_token.expand(B, -1, -1), outer], dim=1) + pos
        return inner, self.pos_drop(outer), grid

    def _run_block(self, blk: nn.Module, inner, outer):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, inner, outer)
        return blk(inner, outer)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, type(self).__name__)
        inner, outer, _ = self._embed(x)
        for blk in self.blocks:
            inner, outer = self._run_block(blk, inner, outer)
        return self.norm(outer)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Outputs of the blocks in ``indices`` (NCHW maps, or NLC tokens) and, unless
        ``intermediates_only``, the final normalised tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        inner, outer, grid = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            inner, outer = self._run_block(blk, inner, outer)
            if i in take_indices:
                intermediates.append(self.norm(outer) if norm else outer)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in intermediates]
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(outer), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# --------------------------------------------------------------------------------------------------
# PyramidTNT

class PyramidStem(nn.Module):
    """Conv stem: words from a stride-2 branch cut into 4x4 groups, sentences from a stride-8 branch."""

    def __init__(self, in_chans: int = 3, dim: int = 80, inner_dim: int = 5):
        super().__init__()
        c = inner_dim

        def cbr(cin, cout, stride, inplace=True):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=inplace)]

        # nn.Sequential keeps the official parameter names (common_conv.0, outer_convs.3, ...)
        self.common_conv = nn.Sequential(*cbr(in_chans, 2 * c, 2))
        self.inner_convs = nn.Sequential(*cbr(2 * c, c, 1, inplace=False))
        self.outer_convs = nn.Sequential(
            *cbr(2 * c, 4 * c, 2), *cbr(4 * c, 8 * c, 2), *cbr(8 * c, dim, 1, inplace=False))
        self.inner_dim = inner_dim
        self.num_words = 16

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Grid]:
        """x (B, C, H, W), H and W multiples of 8 -> words (B*N, 16, c), sentences (B, N, D), grid."""
        B = x.shape[0]
        gh, gw = x.shape[-2] // 8, x.shape[-1] // 8
        x = self.common_conv(x)
        inner = self.inner_convs(x)
        c = inner.shape[1]
        inner = inner.reshape(B, c, gh, 4, gw, 4).permute(0, 2, 4, 3, 5, 1).reshape(B * gh * gw, 16, c)
        outer = self.outer_convs(x).flatten(2).transpose(1, 2)
        return inner, outer, (gh, gw)


class WordMerge(nn.Module):
    """Merge the words of 2x2 neighbouring sentences (an 8x8 word map) into 4x4 words by a 3x3
    stride-2 conv (zero padding at the merged sentence's border). Odd sentence grids are padded
    with zero sentences after the norm, as upstream does."""

    def __init__(self, dim_in: int, dim_out: int, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, grid: Grid, batch: int) -> torch.Tensor:
        BN, M, C = x.shape
        gh, gw = grid
        x = pad_to_even(self.norm(x).reshape(batch, gh, gw, M * C))
        gh2, gw2 = (gh + 1) // 2, (gw + 1) // 2
        # (B, I, a, J, b, r, s, C) -> (B, I, J, a, r, b, s, C): sentence (2I+a, 2J+b) lands at
        # rows a*4+r, cols b*4+s of the merged 8x8 word map
        x = x.reshape(batch, gh2, 2, gw2, 2, 4, 4, C).permute(0, 1, 3, 2, 5, 4, 6, 7)
        x = x.reshape(batch * gh2 * gw2, 8, 8, C)
        x = self.conv(_to_channels_last_view(x))
        return x.permute(0, 2, 3, 1).reshape(batch * gh2 * gw2, M, -1)


class SentenceMerge(nn.Module):
    """Sentence downsampling: LayerNorm then a 3x3 stride-2 conv on the sentence map (ceil size)."""

    def __init__(self, dim_in: int, dim_out: int, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, Grid]:
        B, N, C = x.shape
        x = self.norm(x).reshape(B, grid[0], grid[1], C)
        x = self.conv(_to_channels_last_view(x))
        grid = (x.shape[-2], x.shape[-1])
        return x.permute(0, 2, 3, 1).reshape(B, grid[0] * grid[1], -1), grid


class PyramidStage(nn.Module):
    """Blocks of one PyramidTNT stage sharing a learned (1, heads, Lq, Lk) outer attention bias.

    Only the first block (and the second, in stages deeper than 6) has an inner transformer, as
    upstream. ``grid`` is the sentence grid the bias is stored for.
    """

    def __init__(
            self,
            depth: int,
            dim: int,
            inner_dim: int,
            num_heads: int,
            inner_num_heads: int,
            grid: Grid,
            sr_ratio: int,
            num_words: int = 16,
            drop_path: Sequence[float] = (),
            **block_kwargs,
    ):
        super().__init__()
        self.grid = tuple(grid)
        self.sr_ratio = sr_ratio
        self.key_grid = (grid[0] // sr_ratio, grid[1] // sr_ratio)
        self.blocks = nn.ModuleList([
            TntBlock(
                dim, inner_dim if (j == 0 or (j == 1 and depth > 6)) else 0, num_heads, inner_num_heads, num_words,
                qkv_split="q_kv", sentence_norm=True, sr_ratio=sr_ratio, num_prefix_tokens=0,
                drop_path=drop_path[j] if drop_path else 0., **block_kwargs)
            for j in range(depth)])
        self.relative_pos = nn.Parameter(torch.randn(
            1, num_heads, self.grid[0] * self.grid[1], self.key_grid[0] * self.key_grid[1]))
        self.grad_checkpointing = False

    def forward(self, inner: torch.Tensor, outer: torch.Tensor, grid: Grid):
        bias = stage_bias(self.relative_pos, grid, self.sr_ratio, self.grid, self.key_grid)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                inner, outer = checkpoint(blk, inner, outer, grid, bias)
            else:
                inner, outer = blk(inner, outer, grid, bias)
        return inner, outer


class PyramidTnt(NotScriptable, nn.Module):
    """PyramidTNT: conv stem, four TNT stages with word / sentence merging, mean-pooled head.

    ``forward_features`` returns the normalised NCHW sentence map of the last stage.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 256,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (2, 8, 4, 2),
            dims: Sequence[int] = (128, 256, 512, 512),
            inner_dims: Sequence[int] = (8, 16, 32, 32),
            num_heads: Sequence[int] = (4, 8, 16, 16),
            inner_num_heads: Sequence[int] = (2, 4, 8, 8),
            sr_ratios: Sequence[int] = (4, 2, 1, 1),
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.LayerNorm
        act_layer = act_layer or nn.GELU
        num_stages = len(depths)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.min_size = 8 * sr_ratios[0]

        img_size = to_2tuple(img_size)
        self.patch_embed = PyramidStem(in_chans, dims[0], inner_dims[0])
        self.pos_grid = (img_size[0] // 8, img_size[1] // 8)
        self.outer_pos = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], dims[0]))
        self.inner_pos = nn.Parameter(torch.zeros(1, self.patch_embed.num_words, inner_dims[0]))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # per-block linear rates across all stages, split by stage (upstream's rule)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.word_merges = nn.ModuleList()
        self.sentence_merges = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.feature_info = []
        grid = self.pos_grid
        for i in range(num_stages):
            if i > 0:
                self.word_merges.append(WordMerge(inner_dims[i - 1], inner_dims[i], norm_layer))
                self.sentence_merges.append(SentenceMerge(dims[i - 1], dims[i], norm_layer))
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            self.stages.append(PyramidStage(
                depths[i], dims[i], inner_dims[i], num_heads[i], inner_num_heads[i], grid, sr_ratios[i],
                num_words=self.patch_embed.num_words, drop_path=dpr[i], mlp_ratio=mlp_ratio,
                inner_mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, act_layer=act_layer, norm_layer=norm_layer))
            self.feature_info.append(dict(num_chs=dims[i], reduction=8 * 2 ** i, module=f"stages.{i}"))
        self.norm = norm_layer(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)

        trunc_normal_(self.outer_pos, std=.02)
        trunc_normal_(self.inner_pos, std=.02)
        self.apply(_init_pyramid)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"outer_pos", "inner_pos"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^outer_pos|^inner_pos|^patch_embed",
            blocks=[
                (r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.relative_pos", (0,)),
                # merge i sits between stage i and stage i + 1
                (r"^(?:word|sentence)_merges\.(\d+)", (99998,)),
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
        self.head.reset(num_classes, pool_type=global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def _embed(self, x: torch.Tensor):
        x = pad_to_multiple(x, (8, 8), self.min_size)
        inner, outer, grid = self.patch_embed(x)
        inner = inner + self.inner_pos
        pos = resample_abs_pos_embed(self.outer_pos, new_size=grid, old_size=self.pos_grid, num_prefix_tokens=0)
        return inner, self.pos_drop(outer + pos), grid

    def _stage(self, i: int, inner, outer, grid, batch: int):
        if i > 0:
            inner = self.word_merges[i - 1](inner, grid, batch)
            outer, grid = self.sentence_merges[i - 1](outer, grid)
        inner, outer = self.stages[i](inner, outer, grid)
        return inner, outer, grid

    def _to_map(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return x.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, type(self).__name__)
        B = x.shape[0]
        inner, outer, grid = self._embed(x)
        for i in range(len(self.stages)):
            inner, outer, grid = self._stage(i, inner, outer, grid, B)
        return self._to_map(self.norm(outer), grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Stage outputs in ``indices`` (NCHW; ``norm`` applies the final norm to the last one only,
        the norm has the last stage's width) and, unless ``intermediates_only``, the final map."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        B = x.shape[0]
        inner, outer, grid = self._embed(x)
        last = max_index if stop_early else len(self.stages) - 1
        intermediates = []
        for i in range(last + 1):
            inner, outer, grid = self._stage(i, inner, outer, grid, B)
            if i in take_indices:
                y = self.norm(outer) if norm and i == len(self.stages) - 1 else outer
                intermediates.append(self._to_map(y, grid) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self._to_map(self.norm(outer), grid), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.word_merges = self.word_merges[:max_index]
        self.sentence_merges = self.sentence_merges[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _init_pyramid(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0., math.sqrt(2. / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:
        init_linear_trunc_normal(m)


# --------------------------------------------------------------------------------------------------
# checkpoints

# timm's TNT names -> official names (top level and inside blocks)
_TIMM_TOP = {"patch_pos": "outer_pos", "pixel_pos": "inner_pos", "pixel_embed": "patch_embed",
             "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2"}
_TIMM_BLOCK = {"norm_in": "inner_norm1", "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2",
               "mlp_in": "inner_mlp", "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2",
               "norm_out": "outer_norm1", "attn_out": "outer_attn", "norm_mlp": "outer_norm2", "mlp": "outer_mlp"}


def _unwrap(state_dict):
    for key in ("state_dict", "model", "state_dict_ema"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _resample_grid_tokens(v: torch.Tensor, num_prefix: int, new_grid: Grid) -> torch.Tensor:
    n = v.shape[1] - num_prefix
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"cannot resample a position embedding of {n} tokens: not a square grid")
    return resample_abs_pos_embed(v, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=num_prefix)


def _filter_tnt(state_dict, model: Tnt):
    if "pixel_embed.proj.weight" in state_dict or "patch_pos" in state_dict:
        if "blocks.0.norm2_proj.weight" not in state_dict:
            raise ValueError("timm 'legacy' TNT checkpoints (tnt_s_legacy_patch16_224) use a different word "
                             "embedding and fold and are not supported; use the tnt_s/b_patch16_224 weights")
        out = {}
        for k, v in state_dict.items():
            parts = k.split(".")
            if parts[0] == "blocks":
                parts[2] = _TIMM_BLOCK.get(parts[2], parts[2])
            else:
                parts[0] = _TIMM_TOP.get(parts[0], parts[0])
            k = ".".join(parts)
            if k == "inner_pos" and v.ndim == 4:  # timm keeps (1, c, h, w); official (1, h*w, c)
                v = v.flatten(2).transpose(1, 2)
            out[k] = v
        state_dict = out
    state_dict.pop("outer_tokens", None)  # official: an unused frozen parameter
    if "outer_pos" in state_dict and state_dict["outer_pos"].shape != model.outer_pos.shape:
        state_dict["outer_pos"] = _resample_grid_tokens(state_dict["outer_pos"], 1, model.pos_grid)
    if "inner_pos" in state_dict and state_dict["inner_pos"].shape != model.inner_pos.shape:
        state_dict["inner_pos"] = _resample_grid_tokens(state_dict["inner_pos"], 0, model.patch_embed.word_grid)
    return state_dict


def _filter_pyramid(state_dict, model: PyramidTnt):
    out = {}
    for k, v in state_dict.items():
        if k in ("head.weight", "head.bias"):  # official: a bare Linear; here a timm ClassifierHead
            k = "head.fc." + k.split(".")[1]
        k = k.replace(".conv.0.", ".conv.")  # official merges wrap the conv in a Sequential
        if k.endswith("relative_pos"):
            stage = model.stages[int(k.split(".")[1])]
            if v.shape != stage.relative_pos.shape:
                nq, nk = v.shape[2], v.shape[3]
                sq, sk = math.isqrt(nq), math.isqrt(nk)
                if sq * sq != nq or sk * sk != nk:
                    raise ValueError(f"{k}: cannot resample a {tuple(v.shape)} bias, grids are not square")
                v = resample_relative_pos(v, stage.grid, stage.key_grid, (sq, sq), (sk, sk))
        out[k] = v
    if out["outer_pos"].shape != model.outer_pos.shape:
        out["outer_pos"] = _resample_grid_tokens(out["outer_pos"], 0, model.pos_grid)
    return out


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Official (huawei-noah ``tnt_pytorch``) or timm TNT state dicts -> this module's layout.

    Unwraps training checkpoints (``state_dict`` / ``model`` entries, ``module.`` prefixes),
    renames timm's TNT keys, drops the official unused ``outer_tokens`` and resamples position
    embeddings / relative position biases stored for another grid.
    """
    state_dict = _unwrap(state_dict)
    if isinstance(model, PyramidTnt):
        return _filter_pyramid(state_dict, model)
    return _filter_tnt(state_dict, model)


# --------------------------------------------------------------------------------------------------
# pretrained cfgs and entry points

_TNT_RELEASE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/tnt/"
_ORIGIN = "https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/tnt_pytorch"


def _cfg(url: str = "", **kwargs):
    return hub.cfg(
        url=url,
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9, interpolation="bicubic",
        fixed_input_size=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        first_conv="patch_embed.proj", classifier="head",
        license="apache-2.0", paper_ids="arXiv:2103.00112", paper_name="Transformer in Transformer",
        origin_url=_ORIGIN,
        **kwargs,
    )


def _pcfg(baidu: str, **kwargs):
    args = dict(
        num_classes=1000, input_size=(3, 256, 256), pool_size=(4, 4), crop_pct=0.9, interpolation="bicubic",
        min_input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        first_conv="patch_embed.common_conv.0", classifier="head.fc",
        license="apache-2.0", paper_ids="arXiv:2201.00978",
        paper_name="PyramidTNT: Improved Transformer-in-Transformer Baselines with Pyramid Architecture",
        origin_url=_ORIGIN,
        notes=(f"ImageNet-1k weights are published on BaiduDisk only ({baidu}); download by hand and pass "
               "pretrained_cfg_overlay=dict(file=PATH) - checkpoint_filter_fn reads the official file",),
    )
    args.update(kwargs)
    return hub.cfg(url="", **args)


default_cfgs = generate_default_cfgs({
    # both sources hold the same weights (timm re-hosts the official release); the hub is tried first
    "tnt_s_patch16_224_zoo.in1k": _cfg(
        url=_TNT_RELEASE + "tnt_s_81.5.pth.tar", hf_hub_id="timm/tnt_s_patch16_224.in1k"),
    "tnt_b_patch16_224_zoo.in1k": _cfg(
        url=_TNT_RELEASE + "tnt_b_82.9.pth.tar", hf_hub_id="timm/tnt_b_patch16_224.in1k"),
    "pyramid_tnt_ti": _pcfg(
        "https://pan.baidu.com/s/1xm3DSGcAJbvFQm4jmDAlnQ, password 0r5t",
        input_size=(3, 192, 192), pool_size=(3, 3)),
    "pyramid_tnt_s": _pcfg("https://pan.baidu.com/s/1xha8x3DTlPq9-KeC6EPPow, password v5w5"),
    "pyramid_tnt_m": _pcfg("https://pan.baidu.com/s/1B9zkWkrUAETuiyr08ClY-w, password jqm3"),
    "pyramid_tnt_b": _pcfg("https://pan.baidu.com/s/1tT0mxRrZQx6facYsdPBt0g, password ns4t"),
})


def _create(cls, variant: str, pretrained: bool = False, **kwargs):
    feature_cfg = dict(feature_cls="getter")
    if cls is Tnt:
        feature_cfg["out_indices"] = kwargs.pop("out_indices", 3)
    else:
        feature_cfg["out_indices"] = kwargs.pop("out_indices", (0, 1, 2, 3))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return build_model(
        cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs)


def _pyramid_args(dim: int, inner_dim: int, heads: int, inner_heads: int, depths):
    mult = (1, 2, 4, 4)
    return dict(
        depths=depths, dims=tuple(dim * m for m in mult), inner_dims=tuple(inner_dim * m for m in mult),
        num_heads=tuple(heads * m for m in mult), inner_num_heads=tuple(inner_heads * m for m in mult))


@register_model
def tnt_s_patch16_224_zoo(pretrained: bool = False, **kwargs) -> Tnt:
    """TNT-S: 384-wide sentences, 24-wide words, 12 blocks, 6 / 4 heads."""
    args = dict(patch_size=16, embed_dim=384, inner_dim=24, depth=12, num_heads=6, inner_num_heads=4)
    return _create(Tnt, "tnt_s_patch16_224_zoo", pretrained, **dict(args, **kwargs))


@register_model
def tnt_b_patch16_224_zoo(pretrained: bool = False, **kwargs) -> Tnt:
    """TNT-B: 640-wide sentences, 40-wide words, 12 blocks, 10 / 4 heads."""
    args = dict(patch_size=16, embed_dim=640, inner_dim=40, depth=12, num_heads=10, inner_num_heads=4)
    return _create(Tnt, "tnt_b_patch16_224_zoo", pretrained, **dict(args, **kwargs))


@register_model
def pyramid_tnt_ti(pretrained: bool = False, **kwargs) -> PyramidTnt:
    """PyramidTNT-Ti (trained at 192 px)."""
    args = dict(img_size=192, **_pyramid_args(80, 5, 2, 1, (2, 6, 3, 2)))
    return _create(PyramidTnt, "pyramid_tnt_ti", pretrained, **dict(args, **kwargs))


@register_model
def pyramid_tnt_s(pretrained: bool = False, **kwargs) -> PyramidTnt:
    """PyramidTNT-S (trained at 256 px)."""
    args = dict(img_size=256, **_pyramid_args(128, 8, 4, 2, (2, 8, 4, 2)))
    return _create(PyramidTnt, "pyramid_tnt_s", pretrained, **dict(args, **kwargs))


@register_model
def pyramid_tnt_m(pretrained: bool = False, **kwargs) -> PyramidTnt:
    """PyramidTNT-M (trained at 256 px)."""
    args = dict(img_size=256, **_pyramid_args(192, 12, 4, 2, (2, 8, 6, 2)))
    return _create(PyramidTnt, "pyramid_tnt_m", pretrained, **dict(args, **kwargs))


@register_model
def pyramid_tnt_b(pretrained: bool = False, **kwargs) -> PyramidTnt:
    """PyramidTNT-B (trained at 256 px)."""
    args = dict(img_size=256, **_pyramid_args(256, 16, 4, 2, (2, 10, 6, 2)))
    return _create(PyramidTnt, "pyramid_tnt_b", pretrained, **dict(args, **kwargs))
