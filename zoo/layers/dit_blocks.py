# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from wgsxm/PartCrafter (MIT; Copyright (c) 2025 Yuchen Lin); see THIRD_PARTY_NOTICES.md
"""Pre-norm DiT blocks with U-ViT long skips and q/k RMSNorm, on packed (segment) token layouts.

Written for PartCrafter (TripoSG / HunyuanDiT-style blocks). Tokens of a whole batch are packed
into one sequence of shape ``(1, L, C)``; which tokens may attend which is decided by a
``zoo.kernels`` segment layout the caller builds once per forward (per part for local blocks, per
object for global ones). So one kernel call serves a batch of objects with different part counts.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo.kernels as _kernels

__all__ = ["FP32LayerNorm", "RMSNormHead", "SelfAttention", "CrossAttention", "DiTBlock", "TimestepEmbedder",
           "timestep_sinusoid"]


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (keeps half-precision runs stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNormHead(nn.Module):
    """RMSNorm over the head dim with a learned scale (q/k norm; statistics in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention, standard ``(3, H, hd)`` fused qkv layout, no qkv bias."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNormHead(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNormHead(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout=None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = _kernels.attention(self.q_norm(q), self.k_norm(k), v, layout)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Multi-head cross-attention to condition tokens; k/v fused as ``(2, H, hd)``, no q/kv bias."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool = True, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = RMSNormHead(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNormHead(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, layout=None) -> torch.Tensor:
        B, L, C = x.shape
        M = context.shape[1]
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = _kernels.attention(self.q_norm(q), self.k_norm(k), v, layout)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """[long-skip fusion] -> x + SA(LN x) -> x + CA(LN x, ctx) -> x + FFN(LN x).

    The long-skip fusion is ``LayerNorm(Linear([skip, x]))`` (skip first, norm last): the order the
    TripoSG / PartCrafter weights were trained with.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int, mlp_ratio: float = 4.0, skip: bool = False,
                 qk_norm: bool = True, qkv_bias: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.skip_norm = FP32LayerNorm(dim, eps=norm_eps) if skip else None
        self.norm1 = FP32LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qk_norm=qk_norm, qkv_bias=qkv_bias)
        self.norm2 = FP32LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads, qk_norm=qk_norm, qkv_bias=qkv_bias)
        self.norm3 = FP32LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, self_layout=None, cross_layout=None,
                skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this DiTBlock has a long skip input; pass skip=")
            x = self.skip_norm(self.skip_linear(torch.cat([skip, x], dim=-1)))
        x = x + self.attn(self.norm1(x), self_layout)
        x = x + self.cross_attn(self.norm2(x), context, cross_layout)
        return x + self.mlp(self.norm3(x))


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[sin(t w_i), cos(t w_i)]``, w_i = max_period^(-i / (dim/2)) (sin first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid(t) -> Linear -> GELU -> Linear: the time *token* of the DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(timestep_sinusoid(t, self.dim).to(dtype))))
