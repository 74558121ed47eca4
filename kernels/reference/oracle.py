"""`dense_oracle`: a deliberately naive second implementation for tests (full logits over every
key slot and the layout's `to_dense_mask()`), independent of the plans in core.py."""
from __future__ import annotations

import torch

from ..bias import DenseBias, combine_dense_terms

__all__ = ["dense_oracle"]

_NEG_INF = float("-inf")


def dense_oracle(q, k, v, layout=None, *, scale=None, bias=None, score_mod=None, head_mix=None):
    """Naive full-matrix attention from `layout.to_dense_mask()` (tests only). Virtual border keys of
    a zero-border window become explicit zero keys on the padded map. Returns (out, lse)."""
    B, H, Lq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    if layout is not None:
        k, v, kidx, mask = layout.oracle_keys(k, v)
    else:
        kidx, mask = torch.arange(k.shape[2], device=q.device), None
    if isinstance(bias, torch.Tensor):
        bias = DenseBias(bias)
    mods = [m for m in (score_mod, bias) if m is not None]
    s = torch.matmul(q, k.transpose(-1, -2))
    add, mul = combine_dense_terms(mods, layout, Lq, kidx, q.dtype, q.device)
    s = s * scale if mul is None else s * scale * mul
    if add is not None:
        s = s + add
    if head_mix is not None:
        s = torch.einsum("bhij,hg->bgij", s, head_mix.pre)
    if mask is not None:
        s = s.masked_fill(~mask, _NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = torch.where(torch.isfinite(lse)[..., None], p, torch.zeros_like(p))
    if head_mix is not None and head_mix.post is not None:
        p = torch.einsum("bhij,hg->bgij", p, head_mix.post)
    return p @ v, lse
