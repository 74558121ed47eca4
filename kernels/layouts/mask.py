"""`from_dense_mask`: an arbitrary element mask (B|1, H|1, Lq, Lk), True = attend.

Lowerings: reference = rows of queries with the mask rows; Triton = linear tiles, all-false tiles
skipped, all-true tiles full, the mask bits read in partial tiles; Flex = a mask_mod reading it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lut import from_matrix, linear_tiles
from ..reference.core import RowPlan
from .base import Layout, check_bool

__all__ = ["MaskLayout", "from_dense_mask"]


class MaskLayout(Layout):
    """Element mask layout (built by `from_dense_mask`)."""

    kind = "mask"
    heavy_predicate = True        # partial tiles read mask bits: more registers per tile

    def __init__(self, mask):
        check_bool("from_dense_mask mask", mask, 4)
        self.mask = mask
        self.batch = mask.shape[0] if mask.shape[0] != 1 else None
        self.heads = mask.shape[1] if mask.shape[1] != 1 else None
        self.q_len, self.kv_len = mask.shape[2], mask.shape[3]

    def to_dense_mask(self):
        return self.mask

    # -- lowerings ----------------------------------------------------------------------------------
    def flatten(self):
        return [self.mask], []

    @classmethod
    def unflatten(cls, tensors, ints):
        return cls(tensors[0])

    def block_lut(self, Lq, Lk, dev, block_m, block_n, tile_cap):
        geo, nQB, nKB, qs, qe, ks, ke, clean = linear_tiles(Lq, Lk, dev, block_m, block_n)
        bm, bn = geo["QS"], geo["KS"]
        m = self.mask.to(dev)
        Bm, Hm = m.shape[:2]
        m = F.pad(m, (0, nKB * bn - Lk, 0, nQB * bm - Lq)).view(Bm, Hm, nQB, bm, nKB, bn)
        anyc = m.any(5).any(3)
        allc = m.all(5).all(3) & clean
        C = torch.where(allc, 2, torch.where(anyc, 1, 0)).to(torch.int8)
        return from_matrix(C.contiguous(), **geo)

    def triton_args(self, dev):
        from ..triton.bundles import pair_map
        return dict(mask=pair_map(self.mask.to(device=dev, dtype=torch.int8)))

    def reference_plan(self, B, H, dev):
        return RowPlan(self, B, H, self.q_len, self.kv_len, dev)

    def row_keys(self, u0, u1, Lk, dev):
        return 0, Lk, self.mask[:, :, None, u0:u1]

    def flex_lowering(self, q, k, v):
        m = self.mask
        mb, mh = m.shape[0], m.shape[1]

        def mask_mod(b, h, qi, ki):
            return m[b if mb > 1 else 0, h if mh > 1 else 0, qi, ki]
        return dict(k=k, v=v, mask_mod=mask_mod, nat=lambda ki: ki, local=None)


def from_dense_mask(mask: torch.Tensor) -> MaskLayout:
    """Arbitrary element mask (B|1, H|1, Lq, Lk), True = attend."""
    return MaskLayout(mask)
