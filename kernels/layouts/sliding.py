"""`sliding_window`: 1-D local attention, each query attends a band of keys around its position.

Query i (aligned like `causal`: position i + offset with offset = kv_len − q_len, so the last
query faces the last key) attends key j iff i + offset − left <= j <= i + offset + right.
`right=0` is causal sliding-window attention (Mistral-style); left = right a symmetric window
(Longformer's local attention). Lowerings: reference = rows of queries against the key span of
their band only; Triton = linear tiles, tiles outside the band skipped, tiles inside it full, the
band read as an element mask in the partial tiles along its edges; Flex = the band as a mask_mod.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..lut import from_matrix, linear_tiles
from ..reference.core import RowPlan
from .base import Layout

__all__ = ["SlidingWindowLayout", "sliding_window"]


class SlidingWindowLayout(Layout):
    """Band layout (built by `sliding_window`)."""

    kind = "sliding_window"
    heavy_predicate = True          # partial tiles read the band as mask bits

    def __init__(self, q_len, left, right=None, kv_len=None):
        right = left if right is None else right
        kv_len = q_len if kv_len is None else kv_len
        for n, v in (("q_len", q_len), ("kv_len", kv_len), ("left", left), ("right", right)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"sliding_window: {n} must be an int >= 0, got {v!r}")
        self.q_len, self.kv_len, self.left, self.right = q_len, kv_len, left, right
        self.offset = kv_len - q_len
        # with kv_len >= q_len every query's own aligned position is a key
        self.may_have_empty_rows = self.offset < 0

    def _band(self, i, j):
        c = i + self.offset
        return (j >= c - self.left) & (j <= c + self.right)

    def to_dense_mask(self):
        i = torch.arange(self.q_len)[:, None]
        j = torch.arange(self.kv_len)[None, :]
        return self._band(i, j)[None, None]

    # -- lowerings ----------------------------------------------------------------------------------
    def flatten(self):
        return [], [self.q_len, self.left, self.right, self.kv_len]

    @classmethod
    def unflatten(cls, tensors, ints):
        return cls(*ints)

    def block_lut(self, Lq, Lk, dev, block_m, block_n, tile_cap):
        geo, nQB, nKB, qs, qe, ks, ke, clean = linear_tiles(Lq, Lk, dev, block_m, block_n)
        c0, c1 = (qs + self.offset)[:, None], (qe - 1 + self.offset)[:, None]     # band centres of a tile
        j0, j1 = ks[None, :], (ke - 1)[None, :]
        anyc = (j1 >= c0 - self.left) & (j0 <= c1 + self.right)
        allc = (j0 >= c1 - self.left) & (j1 <= c0 + self.right) & clean
        C = torch.where(allc, 2, torch.where(anyc, 1, 0)).to(torch.int8)[None, None]
        return from_matrix(C.contiguous(), **geo)

    def triton_args(self, dev):
        m = self.__dict__.get("_mask_i8")
        if m is None or m.device != torch.device(dev):
            m = self._mask_i8 = self.to_dense_mask().to(device=dev, dtype=torch.int8)
        from ..triton.bundles import pair_map
        return dict(mask=pair_map(m))

    def reference_plan(self, B, H, dev):
        plan = RowPlan(self, B, H, self.q_len, self.kv_len, dev)
        plan.unit_cost = B * H * max(1, min(self.kv_len, self.left + self.right + 1))
        return plan

    def row_keys(self, u0, u1, Lk, dev):
        k0 = min(max(0, u0 + self.offset - self.left), Lk)
        k1 = max(min(Lk, u1 - 1 + self.offset + self.right + 1), k0)
        i = torch.arange(u0, u1, device=dev)[:, None]
        j = torch.arange(k0, k1, device=dev)[None, :]
        return k0, k1, self._band(i, j)[None, None, None]

    def flex_lowering(self, q, k, v):
        off, lo, hi = self.offset, self.left, self.right

        def mask_mod(b, h, qi, ki):
            c = qi + off
            return (ki >= c - lo) & (ki <= c + hi)
        return dict(k=k, v=v, mask_mod=mask_mod, nat=lambda ki: ki, local=None)

    def __repr__(self):
        return (f"SlidingWindowLayout(q_len={self.q_len}, kv_len={self.kv_len}, left={self.left}, "
                f"right={self.right})")


def sliding_window(q_len: int, left: int, right: Optional[int] = None, *, kv_len: Optional[int] = None
                   ) -> SlidingWindowLayout:
    """1-D sliding-window attention: query i attends keys i + offset − left … i + offset + right
    (offset = kv_len − q_len; right defaults to left; right=0 is causal)."""
    return SlidingWindowLayout(q_len, left, right, kv_len)
