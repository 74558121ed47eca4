# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from rayleizhu/BiFormer (MIT; Copyright (c) Meta Platforms, Inc. and affiliates); see THIRD_PARTY_NOTICES.md
"""Bi-Level Routing Attention (BiFormer) and the dense LePE attention of BiFormer's last stage.

Both modules take and return channels-last maps ``(B, H, W, C)`` and hand every softmax to
``zoo.kernels.attention``. BRA lays tokens out region-major so that the routed pattern is the
kernel's ``routed_topk`` layout: no k-fold gathered copy of K/V is ever built here.

Any map size works: the map is padded up to a multiple of the region grid and the padded tokens
are masked out of both levels (region descriptors average valid tokens only; attention gets
``kv_valid``). Without padding the result is exactly the upstream computation.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_module

import zoo.kernels as zk

__all__ = [
    "BiLevelRoutingAttention", "LePEAttention", "to_regions", "from_regions", "region_routing",
]


def to_regions(x: torch.Tensor, n_win: int, num_heads: int) -> torch.Tensor:
    """``(B, Hp, Wp, H*D)`` map → ``(B, H, n_win² · S, D)`` region-major tokens (S = region area)."""
    B, Hp, Wp, C = x.shape
    rh, rw = Hp // n_win, Wp // n_win
    x = x.reshape(B, n_win, rh, n_win, rw, num_heads, C // num_heads)
    return x.permute(0, 5, 1, 3, 2, 4, 6).reshape(B, num_heads, Hp * Wp, C // num_heads)


def from_regions(x: torch.Tensor, n_win: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of :func:`to_regions`: ``(B, H, L, D)`` → ``(B, Hp, Wp, H*D)``."""
    B, nh, _, D = x.shape
    x = x.reshape(B, nh, n_win, n_win, hp // n_win, wp // n_win, D)
    return x.permute(0, 2, 4, 3, 5, 1, 6).reshape(B, hp, wp, nh * D)


def region_routing(
        q: torch.Tensor,
        k: torch.Tensor,
        region_size: int,
        topk: int,
        scale: float,
        kv_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Top-k key regions per query region from region-mean affinities.

    q, k: region-major ``(B, heads, nR·S, D)``; ``kv_valid`` ``(B|1, nR·S)`` bool marks real
    (unpadded) tokens. Region means cover valid tokens only (the mean over all heads' channels,
    i.e. the whole qk width); all-padding regions are never chosen while a valid one is left.
    Routing is not differentiated (upstream's ``diff_routing=False``): inputs are detached.
    Returns ``(B, nR, topk)`` long.
    """
    B, nh, L, D = q.shape
    S = region_size
    nR = L // S
    q, k = q.detach(), k.detach()
    if kv_valid is not None:
        pad = ~kv_valid[:, None, :, None]
        q, k = q.masked_fill(pad, 0), k.masked_fill(pad, 0)
    q_r = q.reshape(B, nh, nR, S, D).sum(3).transpose(1, 2).reshape(B, nR, nh * D)
    k_r = k.reshape(B, nh, nR, S, D).sum(3).transpose(1, 2).reshape(B, nR, nh * D)
    if kv_valid is None:
        q_r, k_r = q_r / S, k_r / S
        affinity = (q_r * scale) @ k_r.transpose(-1, -2)  # (B, nR, nR)
    else:
        count = kv_valid.reshape(-1, nR, S).sum(-1, keepdim=True).to(q.dtype)  # (B|1, nR, 1)
        q_r, k_r = q_r / count.clamp_min(1), k_r / count.clamp_min(1)
        affinity = (q_r * scale) @ k_r.transpose(-1, -2)
        affinity = affinity.masked_fill(count.transpose(1, 2) == 0, float("-inf"))
    return torch.topk(affinity, k=topk, dim=-1).indices


class BiLevelRoutingAttention(nn.Module):
    """BRA: each of the ``n_win × n_win`` regions attends to its ``topk`` most related regions.

    Parameter layout (and the quirks released weights depend on) follows upstream: one qkv Linear
    ordered [q | k | v] with bias; scale = ``qk_dim ** -0.5`` over the *whole* qk width (not per
    head); local context enhancement (LCE) = depth-wise conv on V added before ``proj``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            n_win: int = 7,
            topk: int = 4,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            qkv_bias: bool = True,
            side_dwconv: int = 5,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        if topk < 1 or n_win < 1:
            raise ValueError(f"topk ({topk}) and n_win ({n_win}) must be >= 1")
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = min(topk, n_win * n_win)
        # Upstream quirk kept for weight compatibility: whole qk width, not head_dim.
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(
            dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def routed_attention(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            region_size: int,
            kv_valid: Optional[torch.Tensor] = None,
            topk_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Routing + routed attention on region-major ``(B, heads, nR·S, D)`` tokens.

        Returns the output ``(B, heads, nR·S, Dv)`` and the routing index used; a given
        ``topk_index`` ``(B, nR, k)`` overrides the router (tests, analysis).
        """
        if topk_index is None:
            topk_index = region_routing(q, k, region_size, self.topk, self.scale, kv_valid)
        if kv_valid is not None:
            kv_valid = kv_valid.expand(q.shape[0], -1)
        layout = zk.routed_topk(topk_index, region_size, kv_valid=kv_valid)
        return zk.attention(q, k, v, layout, scale=self.scale), topk_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        n, nh, qk = self.n_win, self.num_heads, self.qk_dim
        qkv = self.qkv(x)
        # LCE on the unpadded V map, so borders see the conv's own zero padding.
        lepe = self.lepe(qkv[..., 2 * qk:].permute(0, 3, 1, 2)) if self.lepe is not None else None
        pad_h, pad_w = (-H) % n, (-W) % n
        Hp, Wp = H + pad_h, W + pad_w
        kv_valid = None
        if pad_h or pad_w:
            qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
            valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=x.device)
            valid[:, :H, :W] = True
            kv_valid = to_regions(valid, n, 1).reshape(1, Hp * Wp)
        q, k, v = [to_regions(t, n, nh) for t in qkv.split([qk, qk, self.dim], dim=-1)]
        del qkv  # region-major copies from here on; lets inference free the projection early
        out, _ = self.routed_attention(q, k, v, (Hp // n) * (Wp // n), kv_valid)
        del q, k, v
        out = from_regions(out, n, Hp, Wp)
        if kv_valid is not None:
            out = out[:, :H, :W]
        if lepe is not None:
            out = out + lepe.permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))


class LePEAttention(nn.Module):
    """Dense multi-head attention + LePE (depth-wise conv on the block's normed input, not on V).

    BiFormer's last stage (``topk=-2``): upstream defaults kept — 8 heads regardless of width,
    qkv without bias, scale ``head_dim ** -0.5``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            side_dwconv: int = 5,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.Conv2d(
            dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = zk.attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))


# Shape-dependent padding and the kernel call are not symbolically traceable.
register_notrace_module(BiLevelRoutingAttention)
register_notrace_module(LePEAttention)
