"""`causal`: bottom-right aligned causal attention with an optional bidirectional prefix.

Query i (offset = kv_len − q_len) attends key j iff j <= i + offset, or both i + offset and j are
below `prefix`; `kv_valid` masks padded keys. Lowerings: reference = rows of queries against the
keys up to their band edge; Triton = linear tiles, full below the band, the band predicate in
partial tiles; Flex = the same predicate as a mask_mod.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..lut import from_matrix, linear_tiles
from ..reference.core import RowPlan
from .base import Layout, check_bool, triton_kv_valid

__all__ = ["CausalLayout", "causal"]


class CausalLayout(Layout):
    """Bottom-right aligned causal mask with optional bidirectional prefix and key padding."""

    kind = "causal"

    def __init__(self, q_len, kv_len=None, prefix=0, kv_valid=None):
        kv_len = q_len if kv_len is None else kv_len
        for n, v in (("q_len", q_len), ("kv_len", kv_len), ("prefix", prefix)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"causal: {n} must be an int >= 0, got {v!r}")
        self.q_len, self.kv_len, self.prefix = q_len, kv_len, prefix
        self.offset = kv_len - q_len
        if kv_valid is not None:
            check_bool("causal kv_valid", kv_valid, 2)
            if kv_valid.shape[1] != kv_len:
                raise ValueError(f"causal: kv_valid must be (B, kv_len={kv_len}), got {tuple(kv_valid.shape)}")
            self.batch = kv_valid.shape[0]
        self.kv_valid = kv_valid

    def allowed(self, i, j):
        ii = i + self.offset
        return (j <= ii) | ((ii < self.prefix) & (j < self.prefix))

    def to_dense_mask(self):
        dev = self.device
        i = torch.arange(self.q_len, device=dev)[:, None]
        j = torch.arange(self.kv_len, device=dev)[None, :]
        m = self.allowed(i, j)[None, None]
        if self.kv_valid is not None:
            m = m & self.kv_valid[:, None, None, :]
        return m

    # -- lowerings ----------------------------------------------------------------------------------
    def flatten(self):
        return ([self.kv_valid] if self.kv_valid is not None else []), [self.q_len, self.kv_len, self.prefix]

    @classmethod
    def unflatten(cls, tensors, ints):
        return cls(ints[0], ints[1], ints[2], tensors[0] if tensors else None)

    def block_lut(self, Lq, Lk, dev, block_m, block_n, tile_cap):
        geo, nQB, nKB, qs, qe, ks, ke, clean = linear_tiles(Lq, Lk, dev, block_m, block_n)
        off, P = self.offset, self.prefix
        i0, i1 = (qs + off)[:, None], (qe - 1 + off)[:, None]
        j0, j1 = ks[None, :], (ke - 1)[None, :]
        anyc = (j0 <= i1) | ((i0 < P) & (j0 < P))
        allc = (j1 <= i0) | ((i1 < P) & (j1 < P))
        full = allc & clean & (self.kv_valid is None)
        C = torch.where(full, 2, torch.where(anyc, 1, 0)).to(torch.int8)[None, None]
        return from_matrix(C.contiguous(), **geo)

    def triton_args(self, dev):
        from ..triton.bundles import Causal
        return dict(causal=Causal(self.offset, self.prefix), **triton_kv_valid(self.kv_valid, dev))

    def reference_plan(self, B, H, dev):
        return RowPlan(self, B, H, self.q_len, self.kv_len, dev)

    def row_keys(self, u0, u1, Lk, dev):
        kend = min(Lk, max(u1 - 1 + self.offset + 1, self.prefix, 1))
        i = torch.arange(u0, u1, device=dev)[:, None]
        j = torch.arange(kend, device=dev)[None, :]
        mask = self.allowed(i, j)[None, None, None]
        if self.kv_valid is not None:
            mask = mask & self.kv_valid[:, None, None, None, :kend]
        return 0, kend, mask

    def flex_lowering(self, q, k, v):
        off, P, kvv = self.offset, self.prefix, self.kv_valid

        def mask_mod(b, h, qi, ki):
            ii = qi + off
            ok = (ki <= ii) | ((ii < P) & (ki < P))
            if kvv is not None:
                ok = ok & kvv[b, ki]
            return ok
        return dict(k=k, v=v, mask_mod=mask_mod, nat=lambda ki: ki, local=None)

    def __repr__(self):
        return f"CausalLayout(q_len={self.q_len}, kv_len={self.kv_len}, prefix={self.prefix})"


def causal(q_len: int, kv_len: Optional[int] = None, *, prefix: int = 0,
           kv_valid: Optional[torch.Tensor] = None) -> CausalLayout:
    """Causal attention, last query aligned with last key, optional bidirectional prefix."""
    return CausalLayout(q_len, kv_len, prefix, kv_valid)
