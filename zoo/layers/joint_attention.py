# SPDX-License-Identifier: Apache-2.0
# Derived from Seed3D/Puppeteer (Apache-2.0; Copyright (c) 2025 Bytedance Ltd. and/or its affiliates); see THIRD_PARTY_NOTICES.md
"""Building blocks of Puppeteer's skinning network: Fourier point embedding, bone-graph hop
distances, the topology-aware joint attention bias (TAJA) and masked pre-norm attention.

Every softmax attention runs in ``zoo.kernels.attention``. Masking follows the op's conventions:
key padding is a ``segments`` layout (query id 0, key id 0 for valid / -1 for padded keys),
the hop-distance bias an ``IndexedBias`` over a tiny (heads, 11) table. Upstream fills masked
logits with ``-finfo.max`` (a fully masked row becomes uniform); the op writes 0 for such rows,
so query-masked rows are rebuilt as the uniform average of V where reference fidelity is asked for.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import GluMlp

import zoo.kernels as _kernels

__all__ = ["PointEmbed", "joint_hop_distance", "hop_bias_index", "TopologyBias", "MaskedAttention",
           "PreNorm", "geglu_mlp", "key_padding_layout", "query_padding_layout", "HOP_CLIP"]

HOP_CLIP = 9  # hop distances are clamped to [0, 9]; unreachable pairs read 9


class PointEmbed(nn.Module):
    """Fourier features of 6-d points (xyz + normal, or parent xyz + joint xyz).

    Each input coordinate gets ``hidden_dim // 12`` frequencies ``2^k * pi`` (k = 0, 1, ...);
    sin and cos of the projections are concatenated with the raw input and mapped by one Linear.
    ``basis`` is a persistent buffer because the released checkpoints store it.
    """

    def __init__(self, hidden_dim: int = 48, dim: int = 128, in_chans: int = 6):
        super().__init__()
        if hidden_dim % (2 * in_chans):
            raise ValueError(f"PointEmbed: hidden_dim={hidden_dim} must be a multiple of 2 * in_chans = {2 * in_chans}")
        per = hidden_dim // (2 * in_chans)
        freq = (2.0 ** torch.arange(per, dtype=torch.float32)) * math.pi
        basis = torch.zeros(in_chans, per * in_chans)
        for i in range(in_chans):
            basis[i, i * per:(i + 1) * per] = freq
        self.register_buffer("basis", basis)
        self.in_chans = in_chans
        self.mlp = nn.Linear(hidden_dim + in_chans, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_chans:
            raise ValueError(f"PointEmbed expects (..., {self.in_chans}) inputs, got {tuple(x.shape)}")
        proj = x @ self.basis.to(x.dtype)
        return self.mlp(torch.cat([proj.sin(), proj.cos(), x], dim=-1))


def joint_hop_distance(parents: torch.Tensor, valid: Optional[torch.Tensor] = None,
                       max_hops: Optional[int] = None) -> torch.Tensor:
    """Undirected hop distances on the bone graph, batched BFS by boolean frontier products.

    ``parents`` (B, N) or (N,) long: parent index per joint, -1 for a root (or a padded joint).
    ``valid`` (B, N) bool: padded joints take part in no bone. Returns float (B, N, N): 0 on the
    diagonal, inf where unreachable. With ``max_hops`` the search stops there and farther pairs
    are inf too (enough for a clamped bias, and cheaper).
    """
    squeeze = parents.dim() == 1
    if squeeze:
        parents = parents[None]
        valid = valid[None] if valid is not None else None
    if parents.dim() != 2 or parents.dtype.is_floating_point:
        raise ValueError(f"parents must be an integer tensor (B, N) or (N,), got {parents.dtype} {tuple(parents.shape)}")
    B, N = parents.shape
    dev = parents.device
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=dev)
    if valid.shape != parents.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must match parents {tuple(parents.shape)}")
    parents = parents.long()
    # value checks and the early exit need a host sync: eager only (shapes alone drive a traced graph)
    eager = not torch.compiler.is_compiling()
    if eager and bool(((parents >= N) | (parents < -1)).any()):
        raise ValueError(f"parent indices must be -1 (root) or in [0, {N}), got "
                         f"[{int(parents.min())}, {int(parents.max())}]")
    par = parents.clamp(0, N - 1)
    bone = (parents >= 0) & valid & valid.gather(1, par)  # child and parent both valid
    adj = torch.zeros(B, N, N, dtype=torch.bool, device=dev).scatter(2, par[..., None], bone[..., None])
    adj_f = (adj | adj.transpose(1, 2)).float()
    reached = torch.eye(N, dtype=torch.bool, device=dev).expand(B, N, N)
    dist = torch.full((B, N, N), float("inf"), device=dev).masked_fill(reached, 0.0)
    frontier = reached
    limit = N - 1 if max_hops is None else min(int(max_hops), N - 1)
    for hop in range(1, limit + 1):
        nxt = (torch.bmm(frontier.float(), adj_f) > 0) & ~reached
        if eager and not bool(nxt.any()):
            break
        dist = dist.masked_fill(nxt, float(hop))
        reached = reached | nxt
        frontier = nxt
    return dist[0] if squeeze else dist


def hop_bias_index(dist: torch.Tensor, valid: Optional[torch.Tensor] = None, clip: int = HOP_CLIP) -> torch.Tensor:
    """Hop distances (B, N, N) float (inf allowed) -> bias-table index (B, N, N) long.

    Valid pairs read ``clamp(d, 0, clip)`` (inf -> clip); a pair with a padded joint reads the
    extra zero column ``clip + 1``, which gives upstream's zero bias for such pairs.
    """
    idx = torch.nan_to_num(dist, posinf=float(clip)).clamp(0, clip).long()
    if valid is not None:
        pair = valid[:, :, None] & valid[:, None, :]
        idx = torch.where(pair, idx, torch.full_like(idx, clip + 1))
    return idx


class TopologyBias(nn.Module):
    """TAJA: per-head logit bias from the clamped hop distance of two joints.

    ``table[h, d] = scale * (W_p E[d] + b_p)_h`` (E: ``Embedding(clip + 1, dim // 4)``, W_p: Linear
    to heads, ``scale`` a learned scalar, 0.1 at init), plus a zero column for pairs with a padded
    joint. The bias is a function of d only, so the (heads, clip + 2) table is exact.
    """

    def __init__(self, dim: int, num_heads: int, clip: int = HOP_CLIP, scale_init: float = 0.1):
        super().__init__()
        self.clip = clip
        self.rel_pos_embedding = nn.Embedding(clip + 1, dim // 4)
        self.rel_pos_proj = nn.Linear(dim // 4, num_heads)
        self.rel_pos_scale = nn.Parameter(torch.full((1,), float(scale_init)))

    def table(self) -> torch.Tensor:
        t = self.rel_pos_proj(self.rel_pos_embedding.weight) * self.rel_pos_scale  # (clip + 1, H)
        return torch.cat([t.t(), t.new_zeros(t.shape[1], 1)], dim=1)  # (H, clip + 2)

    def forward(self, index: torch.Tensor) -> "_kernels.IndexedBias":
        return _kernels.IndexedBias(self.table(), index)


def key_padding_layout(valid: torch.Tensor, q_len: int):
    """Every query attends only the valid keys (``valid`` (B, Lk) bool)."""
    q_ids = torch.zeros(valid.shape[0], q_len, dtype=torch.long, device=valid.device)
    return _kernels.segments(q_ids, torch.where(valid, 0, -1).long())


def query_padding_layout(valid: torch.Tensor, kv_len: int):
    """Padded queries (``valid`` (B, Lq) False) attend nothing (the op writes 0 for them)."""
    kv_ids = torch.zeros(valid.shape[0], kv_len, dtype=torch.long, device=valid.device)
    return _kernels.segments(torch.where(valid, 0, -1).long(), kv_ids)


class MaskedAttention(nn.Module):
    """Multi-head (cross-)attention with inner width ``heads * dim_head`` (may differ from dim).

    q from ``x`` (no bias), k and v from one ``to_kv`` Linear on the context (no bias), ``to_out``
    with bias. ``key_valid`` masks keys; ``query_valid`` marks padded query rows, which get the
    uniform average of V when ``uniform_padded_queries`` (upstream's ``-finfo.max`` fill), else 0.
    """

    def __init__(self, dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_valid: Optional[torch.Tensor] = None, query_valid: Optional[torch.Tensor] = None,
                bias=None, uniform_padded_queries: bool = True) -> torch.Tensor:
        context = x if context is None else context
        B, Lq, _ = x.shape
        Lk = context.shape[1]
        H, D = self.heads, self.dim_head
        q = self.to_q(x).unflatten(-1, (H, D)).transpose(1, 2)
        kv = self.to_kv(context).unflatten(-1, (2, H, D))
        k, v = kv[..., 0, :, :].transpose(1, 2), kv[..., 1, :, :].transpose(1, 2)
        if key_valid is not None and query_valid is not None:
            raise ValueError("MaskedAttention: pass key_valid or query_valid, not both")
        layout = None
        if key_valid is not None:
            layout = key_padding_layout(key_valid, Lq)
        elif query_valid is not None:
            layout = query_padding_layout(query_valid, Lk)
        out = _kernels.attention(q, k, v, layout, scale=self.scale, bias=bias)  # (B, H, Lq, D)
        if query_valid is not None and uniform_padded_queries:
            fill = v.mean(dim=2, keepdim=True).expand_as(out)
            out = torch.where(query_valid[:, None, :, None], out, fill)
        return self.to_out(out.transpose(1, 2).reshape(B, Lq, H * D))


def geglu_mlp(dim: int, mult: int = 4) -> GluMlp:
    """dim -> 2 * mult * dim, GEGLU (value * gelu(gate)), -> dim (timm's GluMlp, exact GELU)."""
    return GluMlp(dim, hidden_features=dim * mult * 2, out_features=dim, act_layer=nn.GELU, gate_last=True)


class PreNorm(nn.Module):
    """LayerNorm on the input (and a separate one on the context) before ``fn``."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: Optional[int] = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None
        self.fn = fn

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        x = self.norm(x)
        if self.norm_context is not None:
            if context is None:
                raise ValueError("PreNorm with a context norm needs a context tensor")
            kwargs["context"] = self.norm_context(context)
        return self.fn(x, **kwargs)
