"""`routed_topk`: BiFormer bi-level routing attention over region-major tokens, and its lowerings.

Region r holds tokens r·S … r·S+S−1; each query region attends the k key regions of its top-k
row (a region listed twice is attended once). Lowerings: reference plan = one group per query
region with its k regions gathered (dense-mask SDPA when most regions are kept); Triton = one
linear tile per region, the LUT straight from the top-k table (regions below 16 tokens run on
16-row tiles: padding cost, still exact); Flex = a mask_mod reading a dense
region table (so the eager mask and the compiled block structure agree).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..lut import from_matrix, linear_geo
from ..reference.core import Plan
from .base import Layout, check_bool, new_unchecked, triton_kv_valid

__all__ = ["RoutedLayout", "routed_topk", "DENSE_ROUTED_FRACTION", "DENSE_ROUTED_MAX_MASK"]

# routed layouts keeping at least this fraction of the regions run as SDPA over a dense bool mask
# (if that mask has at most DENSE_ROUTED_MAX_MASK elements) on the reference backend
DENSE_ROUTED_FRACTION = 0.25
DENSE_ROUTED_MAX_MASK = 1 << 24


class RoutedLayout(Layout):
    """BiFormer bi-level routing: tokens region-major, each query region attends k key regions."""

    kind = "routed"

    def __init__(self, topk_index, region_size, kv_valid=None):
        if not isinstance(topk_index, torch.Tensor) or topk_index.dtype not in (torch.int64, torch.int32) \
                or topk_index.dim() not in (3, 4):
            raise ValueError("routed_topk: topk_index must be an int64/int32 tensor (B, nR, k) or "
                             f"(B, H, nR, k), got {getattr(topk_index, 'dtype', type(topk_index))} "
                             f"{tuple(getattr(topk_index, 'shape', ()))}")
        if not isinstance(region_size, int) or region_size < 1:
            raise ValueError(f"routed_topk: region_size must be a positive int, got {region_size!r}")
        idx = topk_index.long()
        if idx.dim() == 3:
            idx = idx[:, None]
        B, Hk, nR, k = idx.shape
        if k < 1 or nR < 1:
            raise ValueError(f"routed_topk: topk_index must list at least one key region for each of at least "
                             f"one query region (k >= 1, nR >= 1), got shape {tuple(topk_index.shape)}")
        if idx.numel() and not torch.compiler.is_compiling() and (int(idx.min()) < 0 or int(idx.max()) >= nR):
            raise ValueError(f"routed_topk: topk_index values must be in [0, nR={nR}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        self.topk_index = idx                   # (B, Hk, nR, k)
        self.region_size, self.num_regions, self.topk = region_size, nR, k
        self.q_len = self.kv_len = nR * region_size
        self.batch, self.heads = B, (Hk if Hk > 1 else None)
        if kv_valid is not None:
            check_bool("routed_topk kv_valid", kv_valid, 2)
            if kv_valid.shape != (B, self.kv_len) and kv_valid.shape != (1, self.kv_len):
                raise ValueError(f"routed_topk: kv_valid must be (B={B}, nR*S={self.kv_len}), got "
                                 f"{tuple(kv_valid.shape)}")
        self.kv_valid = kv_valid
        self.may_have_empty_rows = kv_valid is not None
        # duplicates in a top-k list are attended once: mark the later copies
        eq = idx[..., :, None] == idx[..., None, :]
        self.dup = torch.tril(eq, diagonal=-1).any(-1)     # (B, Hk, nR, k)

    def to_dense_mask(self):
        B, Hk, nR, k = self.topk_index.shape
        S = self.region_size
        rm = torch.zeros(B, Hk, nR, nR, dtype=torch.bool, device=self.topk_index.device)
        rm.scatter_(-1, self.topk_index, True)
        m = rm.repeat_interleave(S, dim=2).repeat_interleave(S, dim=3)
        if self.kv_valid is not None:
            m = m & self.kv_valid[:, None, None, :]
        return m

    # -- lowerings ----------------------------------------------------------------------------------
    def flatten(self):
        return [self.topk_index] + ([self.kv_valid] if self.kv_valid is not None else []), [self.region_size]

    @classmethod
    def unflatten(cls, tensors, ints):
        topk_index, S = tensors[0], ints[0]
        kv_valid = tensors[1] if len(tensors) > 1 else None
        B, Hk, nR, k = topk_index.shape
        eq = topk_index[..., :, None] == topk_index[..., None, :]
        return new_unchecked(cls, topk_index=topk_index, region_size=S, num_regions=nR, topk=k, q_len=nR * S,
                             kv_len=nR * S, batch=B, heads=(Hk if Hk > 1 else None), kv_valid=kv_valid,
                             may_have_empty_rows=kv_valid is not None,
                             dup=torch.tril(eq, diagonal=-1).any(-1))

    def block_lut(self, Lq, Lk, dev, block_m, block_n, tile_cap):
        S = self.region_size
        geo = linear_geo(S, S, Lq, Lk)
        geo["k_pad"] = S != geo["BN"]
        idx = self.topk_index.to(dev)
        B, Hk, nR, k = idx.shape
        C = torch.zeros(B, Hk, nR, nR, dtype=torch.int8, device=dev)
        C.scatter_(-1, idx, 1 if self.kv_valid is not None else 2)   # duplicates collapse here
        return from_matrix(C, **geo)

    def triton_args(self, dev):
        return triton_kv_valid(self.kv_valid, dev)

    def reference_plan(self, B, H, dev):
        return _RoutedPlan(self, B, H, dev)

    def reference_shortcut(self, q, k, v, scale, mods, return_lse, dropout_p):
        # many small routed regions (BiFormer stage 3: top-16 of 49 regions of 4 tokens): one fused
        # SDPA over the dense mask beats gathering tiny per-region blocks (6x at that shape); no row
        # is empty
        Lq, Lk = q.shape[2], k.shape[2]
        if (not mods and not return_lse and dropout_p == 0 and self.kv_valid is None
                and self.topk >= DENSE_ROUTED_FRACTION * self.num_regions
                and self.topk_index.shape[0] * self.topk_index.shape[1] * Lq * Lk <= DENSE_ROUTED_MAX_MASK):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.to_dense_mask(), scale=scale), None
        return None

    def flex_lowering(self, q, k, v):
        S = self.region_size
        idx = self.topk_index
        table = torch.zeros(*idx.shape[:3], self.num_regions, dtype=torch.bool, device=q.device)
        table.scatter_(-1, idx.to(q.device), True)                       # (B, Hk, nR, nR) region table
        hk = table.shape[1]
        kvv = self.kv_valid

        def mask_mod(b, h, qi, ki):
            ok = table[b, h if hk > 1 else 0, qi // S, ki // S]
            if kvv is not None:
                ok = ok & kvv[b, ki]
            return ok
        return dict(k=k, v=v, mask_mod=mask_mod, nat=lambda ki: ki, local=None)

    def __repr__(self):
        return (f"RoutedLayout(regions={self.num_regions}, region_size={self.region_size}, "
                f"topk={self.topk}, kv_valid={self.kv_valid is not None})")


def routed_topk(topk_index: torch.Tensor, region_size: int, *, kv_valid: Optional[torch.Tensor] = None
                ) -> RoutedLayout:
    """BiFormer routed attention over region-major tokens (see kernels/API.md)."""
    return RoutedLayout(topk_index, region_size, kv_valid=kv_valid)



class _RoutedPlan(Plan):
    def __init__(self, lay: RoutedLayout, B, H, dev):
        self.lay, self.B, self.H, self.dev = lay, B, H, dev
        S, k, nR = lay.region_size, lay.topk, lay.num_regions
        self.units = nR
        self.unit_cost = B * H * S * k * S
        self.safe = lay.may_have_empty_rows
        self.S = S
        ar = torch.arange(S, device=dev)
        self.qi = (torch.arange(nR, device=dev)[:, None] * S + ar)            # (nR, S)
        self.ki = (lay.topk_index[..., None] * S + ar).flatten(-2)             # (B, Hk, nR, k*S)
        self.has_dup = bool(lay.dup.any())

    def get(self, u0, u1, q, k, v):
        lay, S = self.lay, self.S
        B, H, L, D = q.shape
        nR, kk = lay.num_regions, lay.topk
        Bi, Hk = lay.topk_index.shape[:2]
        qg = q.view(B, H, nR, S, D)[:, :, u0:u1]
        ti = lay.topk_index[:, :, u0:u1]                                     # (Bi, Hk, Gc, k)
        bi = torch.arange(B, device=ti.device).view(B, 1, 1, 1)
        hi = torch.arange(H, device=ti.device).view(1, H, 1, 1)

        def gather(t):
            # advanced indexing copies whole regions; ~1.3-1.9x faster than torch.gather with an
            # index expanded to the output size
            C = t.shape[-1]
            g = t.reshape(B, H, nR, S * C)[bi, hi, ti]                        # (B, H, Gc, k, S*C)
            return g.view(B, H, u1 - u0, kk * S, C)

        kg, vg = gather(k), gather(v)
        mask = None
        if self.has_dup:
            mask = (~lay.dup[:, :, u0:u1]).repeat_interleave(S, dim=-1).unsqueeze(-2)   # (B,Hk,Gc,1,N)
        if lay.kv_valid is not None:
            ki = self.ki[:, :, u0:u1]                                          # (Bi, Hk, Gc, N)
            Bk = max(lay.kv_valid.shape[0], ki.shape[0])
            kvv = lay.kv_valid.expand(Bk, -1)
            vm = kvv[torch.arange(Bk, device=ki.device).view(Bk, 1, 1, 1), ki].unsqueeze(-2)
            mask = vm if mask is None else mask & vm
        ctx = dict(qi=self.qi[u0:u1], ki=self.ki[:, :, u0:u1])
        return qg, kg, vg, mask, ctx

    def assemble(self, out, lse):
        B, H, G, M, Dv = out.shape
        return out.reshape(B, H, G * M, Dv), (lse.reshape(B, H, G * M) if lse is not None else None)

