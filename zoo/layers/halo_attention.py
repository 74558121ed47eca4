# SPDX-License-Identifier: Apache-2.0
# Derived from huggingface/pytorch-image-models (Apache-2.0; Copyright 2025 Ross Wightman); see THIRD_PARTY_NOTICES.md
"""Halo attention (blocked local) and BoTNet-style dense attention, both on ``zoo.kernels.attention``.

Both layers keep timm's parameter names and shapes (``q``/``kv`` or ``qkv`` 1x1 convs,
``pos_embed.height_rel`` / ``pos_embed.width_rel``), so timm's byoanet checkpoints load without
renaming. The attention itself — blocking, halo windows, zero border, relative-position logits,
softmax — is the op's job: the layers only project, describe the pattern (a ``window_2d`` layout
or dense) and pass the query-dependent position logits as a :class:`zoo.kernels.RelPosBias`.

Position logits (Attention-Augmented-Conv / BoTNet style): for a query q and a relative offset r
the logit is ``q . rel_table[r]``; the op looks the right entry up per (query, key) pair. For
halo windows the offset is measured in *local* coordinates (key position inside the window minus
query position inside its block), which is what timm's weights were trained with.

Inputs of any size: timm asserts that a halo map is a block multiple. Here the map is padded at
the bottom/right to the next block multiple, padded keys are removed from the softmax
(``kv_valid``) and the output is cropped back; sizes timm accepts need no padding, so they give
timm's numbers.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import make_divisible, to_2tuple, trunc_normal_
from timm.layers import register_notrace_module

from zoo.errors import NotScriptable, check_batch
from zoo.kernels import RelPosBias, attention, window_2d

__all__ = ['QueryRelPosLogits', 'HaloAttention', 'BottleneckRelPosAttention']


class QueryRelPosLogits(nn.Module):
    """Learned 1-D relative-position key tables for the two axes; ``forward(q)`` gives
    ``q . table[r]`` for every offset r, in the ``(B, H, L, R)`` form RelPosBias takes."""

    def __init__(self, size_h: int, size_w: int, dim_head: int, scale: float, device=None, dtype=None):
        super().__init__()
        self.scale = scale
        # offsets -(n-1)..(n-1) for an axis of n key positions: 2n - 1 rows (odd, centred)
        self.height_rel = nn.Parameter(torch.empty(2 * size_h - 1, dim_head, device=device, dtype=dtype))
        self.width_rel = nn.Parameter(torch.empty(2 * size_w - 1, dim_head, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        trunc_normal_(self.height_rel, std=self.scale)
        trunc_normal_(self.width_rel, std=self.scale)

    def forward(self, q: torch.Tensor, mult: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        # one matmul against both tables, split into views
        rh = self.height_rel.shape[0]
        table = torch.cat([self.height_rel, self.width_rel], 0)
        if mult is not None:
            table = table * mult
        rel = q @ table.transpose(0, 1)
        return rel[..., :rh], rel[..., rh:]


def _check_border(border: str):
    if border not in ('zero', 'clamp'):
        raise ValueError(f"border must be 'zero' (timm: zero halo keys take part) or 'clamp' (NATTEN-style), got {border!r}")


class HaloAttention(NotScriptable, nn.Module):
    """Blocked local self-attention: each ``block x block`` query block attends the
    ``(block + 2 * halo)^2`` window around it (HaloNet, arXiv 2103.12731).

    Drop-in for timm's ``HaloAttn`` (same arguments, parameters and outputs, including the
    per-head interleaved ``kv`` projection and no output projection), with two additions:
    ``border`` (``'zero'``: timm's zero-padded halo keys that stay in the softmax; ``'clamp'``:
    windows shifted inside the map) and ``pad_keys`` for inputs that are not block multiples
    (``'mask'``: padded keys are excluded; ``'zero'``: they behave like the zero border).

    Args:
        dim: input channels.
        dim_out: output channels = value width (``num_heads * dim_head_v``); ``dim`` if None.
        feat_size: unused (argument compatibility with the other ByoaNet layers).
        stride: 1 or 2. With 2 the queries are subsampled inside each block (strided q conv);
            if the block is odd (or ``avg_down``) full-resolution attention is average-pooled.
        num_heads: attention heads.
        dim_head: q/k head width; ``make_divisible(dim_out * qk_ratio, 8) // num_heads`` if None.
        block_size, halo_size: query block edge and halo width (key window = block + 2 * halo).
        qk_ratio: q/k width relative to ``dim_out`` when ``dim_head`` is None.
        qkv_bias: bias in the q and kv projections.
        avg_down: downsample by average pooling instead of strided query blocks.
        scale_pos_embed: scale the position logits together with q.k (timm's flag; off in timm's
            released models: logits are ``q.k * scale + pos``).
    """

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            feat_size: Optional[Tuple[int, int]] = None,
            stride: int = 1,
            num_heads: int = 8,
            dim_head: Optional[int] = None,
            block_size: int = 8,
            halo_size: int = 3,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            avg_down: bool = False,
            scale_pos_embed: bool = False,
            border: str = 'zero',
            pad_keys: str = 'mask',
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f'dim_out ({dim_out}) must be divisible by num_heads ({num_heads})')
        if stride not in (1, 2):
            raise ValueError(f'HaloAttention supports stride 1 or 2, got {stride}')
        if block_size < 1 or halo_size < 0:
            raise ValueError(f'need block_size >= 1 and halo_size >= 0, got {block_size}, {halo_size}')
        _check_border(border)
        if pad_keys not in ('mask', 'zero'):
            raise ValueError(f"pad_keys must be 'mask' or 'zero', got {pad_keys!r}")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.border = border
        self.pad_keys = pad_keys
        use_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if (stride > 1 and not use_pool) else 1
        self.block_size_ds = block_size // self.block_stride

        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        # one projection, channels grouped per head as [k_h0, v_h0, k_h1, v_h1, ...] (timm's layout)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)
        # queries index offsets inside their (strided) block, keys inside the window
        self.pos_embed = QueryRelPosLogits(self.win_size, self.win_size, self.dim_head_qk, self.scale, **dd)
        # ceil_mode: odd maps give ceil(H/2) like the strided shortcut conv (timm floors; same at even sizes)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if use_pool else nn.Identity()
        self._layouts: Dict[tuple, object] = {}
        self.reset_parameters()

    def reset_parameters(self):
        std = self.q.weight.shape[1] ** -0.5
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        self.pos_embed.reset_parameters()

    def _layout(self, hp: int, wp: int, h: int, w: int, batch: int, device: torch.device):
        """window_2d layout for a padded hp x wp map holding a real h x w map (cached per shape)."""
        masked = self.pad_keys == 'mask' and (hp != h or wp != w)
        key = (hp, wp, h if masked else hp, w if masked else wp, batch if masked else 0, device)
        layout = self._layouts.get(key)
        if layout is None:
            kv_valid = None
            if masked:
                valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
                valid[:h, :w] = True
                kv_valid = valid.reshape(1, hp * wp).expand(batch, -1)
            layout = window_2d(
                hp, wp, self.block_size, self.halo_size,
                border=self.border, stride=self.block_stride, kv_valid=kv_valid,
            )
            if len(self._layouts) >= 8:
                self._layouts.clear()
            self._layouts[key] = layout
        return layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, type(self).__name__)
        B, _, H, W = x.shape
        bs, s = self.block_size, self.block_stride
        hp, wp = math.ceil(H / bs) * bs, math.ceil(W / bs) * bs
        hq, wq = hp // s, wp // s

        q = self.q(x)  # (B, heads * dqk, ceil(H / s), ceil(W / s))
        kv = self.kv(x)
        out_h, out_w = q.shape[-2:]
        if hp != H or wp != W:
            q = F.pad(q, (0, wq - out_w, 0, hq - out_h))
            kv = F.pad(kv, (0, wp - W, 0, hp - H))

        q = q.reshape(B, self.num_heads, self.dim_head_qk, hq * wq).transpose(-1, -2)
        kv = kv.reshape(B, self.num_heads, self.dim_head_qk + self.dim_head_v, hp * wp)
        k = kv[:, :, :self.dim_head_qk].transpose(-1, -2)
        v = kv[:, :, self.dim_head_qk:].transpose(-1, -2)

        rel_h, rel_w = self.pos_embed(q, self.scale if self.scale_pos_embed else None)
        layout = self._layout(hp, wp, H, W, B, x.device)
        out = attention(q, k, v, layout, scale=self.scale, bias=RelPosBias(rel_h, rel_w))

        out = out.transpose(-1, -2).reshape(B, self.dim_out_v, hq, wq)
        if hq != out_h or wq != out_w:
            out = out[:, :, :out_h, :out_w]
        return self.pool(out)


class BottleneckRelPosAttention(NotScriptable, nn.Module):
    """Global multi-head self-attention over the feature map with 2-D relative-position logits
    (BoTNet, arXiv 2101.11605); drop-in for timm's ``BottleneckAttn`` (same arguments and
    parameters: one ``qkv`` conv laid out [q | k | v], each head-major; no output projection).

    The position tables are sized for ``feat_size``; any map up to that size works (its offsets
    are a subset of the table), larger maps raise.
    """

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            feat_size: Optional[Tuple[int, int]] = None,
            stride: int = 1,
            num_heads: int = 4,
            dim_head: Optional[int] = None,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            scale_pos_embed: bool = False,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if feat_size is None:
            raise ValueError('BottleneckRelPosAttention needs feat_size (the largest (H, W) map it will see) '
                             'to size its position tables; build the model with img_size=...')
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f'dim_out ({dim_out}) must be divisible by num_heads ({num_heads})')
        if stride not in (1, 2):
            raise ValueError(f'BottleneckRelPosAttention supports stride 1 or 2, got {stride}')
        self.feat_size = to_2tuple(feat_size)
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed

        self.qkv = nn.Conv2d(dim, 2 * self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)
        self.pos_embed = QueryRelPosLogits(*self.feat_size, self.dim_head_qk, self.scale, **dd)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        trunc_normal_(self.qkv.weight, std=self.qkv.weight.shape[1] ** -0.5)
        self.pos_embed.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, type(self).__name__)
        B, _, H, W = x.shape
        if H > self.feat_size[0] or W > self.feat_size[1]:
            raise ValueError(
                f'BottleneckRelPosAttention got a {H}x{W} map; its position tables cover maps up to '
                f'{self.feat_size[0]}x{self.feat_size[1]} (rebuild the model with a larger img_size)')
        L = H * W
        q, k, v = torch.split(self.qkv(x), [self.dim_out_qk, self.dim_out_qk, self.dim_out_v], dim=1)
        q = q.reshape(B, self.num_heads, self.dim_head_qk, L).transpose(-1, -2)
        k = k.reshape(B, self.num_heads, self.dim_head_qk, L).transpose(-1, -2)
        v = v.reshape(B, self.num_heads, self.dim_head_v, L).transpose(-1, -2)
        rel_h, rel_w = self.pos_embed(q, self.scale if self.scale_pos_embed else None)
        # the op centres the tables: a smaller map just reads the middle rows
        bias = RelPosBias(rel_h, rel_w, q_grid=(H, W), k_grid=(H, W))
        out = attention(q, k, v, None, scale=self.scale, bias=bias)
        out = out.transpose(-1, -2).reshape(B, self.dim_out_v, H, W)
        return self.pool(out)


# shape-dependent padding and layout caching: keep them out of FX graphs
register_notrace_module(HaloAttention)
register_notrace_module(BottleneckRelPosAttention)
