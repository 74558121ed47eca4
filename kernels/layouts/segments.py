"""`segments` / `varlen`: attention within segments (documents, parts, groups), and its lowerings.

Query i attends key j iff q_ids[i] == kv_ids[j] >= 0 (−1 = padding). Lowerings: reference plan =
one group per (batch, segment id) with its tokens packed; Triton = linear tiles, a tile pair kept
when the id ranges overlap (full when both tiles hold one and the same id), the id predicate in
partial tiles; Flex = an id-equality mask_mod.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..lut import from_matrix, linear_tiles
from ..reference.core import Plan
from .base import Layout

__all__ = ["SegmentLayout", "segments", "varlen"]

_NEG_INF = float("-inf")


class SegmentLayout(Layout):
    """Query i attends key j iff q_ids[i] == kv_ids[j] >= 0 (block-diagonal for contiguous ids)."""

    kind = "segments"

    def __init__(self, q_ids, kv_ids=None):
        for n, t in (("q_ids", q_ids), ("kv_ids", kv_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool \
                    or t.dim() != 2:
                raise ValueError(f"segments: {n} must be an integer tensor (B, L), got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if kv_ids is None:
            kv_ids = q_ids
        if kv_ids.shape[0] != q_ids.shape[0]:
            raise ValueError(f"segments: q_ids batch {q_ids.shape[0]} != kv_ids batch {kv_ids.shape[0]}")
        self.q_ids, self.kv_ids = q_ids.long(), kv_ids.long()
        self.batch = q_ids.shape[0]
        self.q_len, self.kv_len = q_ids.shape[1], kv_ids.shape[1]
        self._groups = None

    # -- lowerings ----------------------------------------------------------------------------------
    def flatten(self):
        return [self.q_ids, self.kv_ids], []

    @classmethod
    def unflatten(cls, tensors, ints):
        return cls(tensors[0], tensors[1])

    def block_lut(self, Lq, Lk, dev, block_m, block_n, tile_cap):
        geo, nQB, nKB, qs, qe, ks, ke, clean = linear_tiles(Lq, Lk, dev, block_m, block_n)
        bm, bn = geo["QS"], geo["KS"]
        big = torch.iinfo(torch.int64).max

        def ranges(ids, span, n, L):
            B = ids.shape[0]
            x = F.pad(ids.to(dev), (0, n * span - L), value=-1).view(B, n, span)
            valid = x >= 0
            mn = torch.where(valid, x, torch.full_like(x, big)).amin(-1)
            mx = torch.where(valid, x, torch.full_like(x, -1)).amax(-1)
            return mn, mx, valid.all(-1)

        qmn, qmx, qall = ranges(self.q_ids, bm, nQB, Lq)
        kmn, kmx, kall = ranges(self.kv_ids, bn, nKB, Lk)
        anyc = (qmn[:, :, None] <= kmx[:, None, :]) & (kmn[:, None, :] <= qmx[:, :, None])
        full = (qall & (qmn == qmx))[:, :, None] & (kall & (kmn == kmx))[:, None, :] \
            & (qmn[:, :, None] == kmn[:, None, :]) & clean
        C = torch.where(full, 2, torch.where(anyc, 1, 0)).to(torch.int8)[:, None]
        return from_matrix(C.contiguous(), **geo)

    def triton_args(self, dev):
        qi = self.q_ids.to(device=dev, dtype=torch.int32).contiguous()
        ki = self.kv_ids.to(device=dev, dtype=torch.int32).contiguous()
        from ..triton.bundles import Segments
        return dict(segments=Segments(qi, ki, qi.stride(0) if qi.shape[0] > 1 else 0,
                                      ki.stride(0) if ki.shape[0] > 1 else 0))

    def reference_plan(self, B, H, dev):
        return _SegmentPlan(self, B, H, dev)

    def flex_lowering(self, q, k, v):
        qids, kids = self.q_ids, self.kv_ids

        def mask_mod(b, h, qi, ki):
            return (qids[b, qi] == kids[b, ki]) & (qids[b, qi] >= 0)
        return dict(k=k, v=v, mask_mod=mask_mod, nat=lambda ki: ki, local=None)

    def to_dense_mask(self):
        q, k = self.q_ids[:, :, None], self.kv_ids[:, None, :]
        return ((q == k) & (q >= 0) & (k >= 0))[:, None]

    def groups(self):
        """Pad every (batch, id) segment into a group. Returns (gb (G,), q_index (G, Mq) with -1 pad,
        k_index (G, Nk) with -1 pad). Cached."""
        if self._groups is not None:
            return self._groups
        B = self.batch
        dev = self.q_ids.device
        big = int(max(int(self.q_ids.max()) if self.q_ids.numel() else 0,
                      int(self.kv_ids.max()) if self.kv_ids.numel() else 0)) + 1
        bq = torch.arange(B, device=dev)[:, None] * big
        qkey = torch.where(self.q_ids >= 0, self.q_ids + bq, torch.full_like(self.q_ids, -1)).reshape(-1)
        kkey = torch.where(self.kv_ids >= 0, self.kv_ids + bq, torch.full_like(self.kv_ids, -1)).reshape(-1)
        uniq = torch.unique(qkey[qkey >= 0])
        G = uniq.numel()

        def pack(keys, L):
            sel = torch.nonzero(keys >= 0).squeeze(1)
            pos = torch.searchsorted(uniq, keys[sel]).clamp_max(max(G - 1, 0))
            ok = (G > 0) & (uniq[pos] == keys[sel]) if G > 0 else torch.zeros_like(sel, dtype=torch.bool)
            sel, pos = sel[ok], pos[ok]
            counts = torch.bincount(pos, minlength=G)
            M = int(counts.max()) if counts.numel() else 0
            order = torch.argsort(pos, stable=True)
            sel, pos = sel[order], pos[order]
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(pos.numel(), device=dev) - start[pos]
            out = torch.full((G, max(M, 1)), -1, dtype=torch.long, device=dev)
            out[pos, rank] = sel % L
            return out

        q_index = pack(qkey, self.q_len)
        k_index = pack(kkey, self.kv_len)
        gb = torch.div(uniq, big, rounding_mode="floor")
        self._groups = (gb, q_index, k_index)
        return self._groups



def segments(q_ids: torch.Tensor, kv_ids: Optional[torch.Tensor] = None) -> SegmentLayout:
    """Segment (document / part / group) attention from per-token ids; -1 = padding."""
    return SegmentLayout(q_ids, kv_ids)


def _ids_from_cu(cu, name):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point or cu.numel() < 2:
        raise ValueError(f"varlen: {name} must be a 1-D integer tensor of n+1 cumulative lengths")
    cu = cu.long()
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"varlen: {name} must start at 0 and be non-decreasing, got {cu.tolist()}")
    L = int(cu[-1])
    pos = torch.arange(L, device=cu.device)
    return (torch.searchsorted(cu, pos, right=True) - 1)[None]


def varlen(cu_seqlens_q: torch.Tensor, cu_seqlens_k: Optional[torch.Tensor] = None) -> SegmentLayout:
    """Packed sequences at batch 1 (flash-attn cu_seqlens convention)."""
    qi = _ids_from_cu(cu_seqlens_q, "cu_seqlens_q")
    if cu_seqlens_k is None:
        return SegmentLayout(qi)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError("varlen: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    return SegmentLayout(qi, _ids_from_cu(cu_seqlens_k, "cu_seqlens_k"))



class _SegmentPlan(Plan):
    def __init__(self, lay: SegmentLayout, B, H, dev):
        self.lay, self.B, self.H, self.dev = lay, B, H, dev
        self.gb, self.qi, self.ki = lay.groups()
        self.units = self.gb.numel()
        self.unit_cost = H * self.qi.shape[1] * self.ki.shape[1]
        # equal-length segments (varlen of equal sequences, TNT-style groups): no padding to mask
        self.dense = bool((self.qi >= 0).all()) and bool((self.ki >= 0).all())
        self.safe = not self.dense

    def _take(self, t, idx, gb):
        # t (B, H, L, C) -> (1, H, Gc, M, C)
        tt = t.transpose(1, 2)                                     # (B, L, H, C)
        g = tt[gb[:, None], idx.clamp_min(0)]                      # (Gc, M, H, C)
        return g.permute(2, 0, 1, 3).unsqueeze(0)

    def get(self, u0, u1, q, k, v):
        gb, qi, ki = self.gb[u0:u1], self.qi[u0:u1], self.ki[u0:u1]
        qg, kg, vg = self._take(q, qi, gb), self._take(k, ki, gb), self._take(v, ki, gb)
        mask = None if self.dense else (ki >= 0)[None, None, :, None, :]
        ctx = dict(qi=qi, ki=ki[None, None], gb=gb)
        return qg, kg, vg, mask, ctx

    def assemble(self, out, lse):
        B, Lq = self.B, self.lay.q_len
        _, H, G, M, Dv = out.shape
        o = out.new_zeros(B, Lq, H, Dv)
        l = None
        valid = self.qi >= 0
        if G:
            b = self.gb[:, None].expand_as(self.qi)[valid]
            i = self.qi[valid]
            o = o.index_put((b, i), out[0].permute(1, 2, 0, 3)[valid])
        o = o.transpose(1, 2)
        if lse is not None:
            l = lse.new_full((B, Lq, H), _NEG_INF)
            if G:
                l = l.index_put((b, i), lse[0].permute(1, 2, 0)[valid])
            l = l.transpose(1, 2)
        return o, l

