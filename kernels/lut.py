"""Block LUTs for the Triton kernels, in FlexAttention's format.

For every query tile: the partial key tiles (element predicate applied) and the full key tiles
(no predicate), `(num, idx[MAX])` each; and the transposed lists (per key tile: its query tiles)
that the dK/dV kernel walks. Pure torch, vectorised, cached on the layout object.

Token -> tile mapping ("modes"):
- linear: tile t covers tokens [t·span, t·span + span), the tile is `span` rounded up to a power of
  two (>= 16); used by dense, causal, segments, dense masks and routed regions.
- win2d (window_2d): a query tile is one query block (bq x bq, padded to powers of two); key tiles
  are span_y x span_x rectangles of the key map on a grid anchored at (-halo, -halo) for
  border="zero", so interior windows are covered without waste. Out-of-map key positions inside a
  window are the virtual border keys (k = v = 0) and are computed in-kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .layout import CausalLayout, MaskLayout, RoutedLayout, SegmentLayout, WindowLayout

__all__ = ["BlockLUT", "build_lut", "next_pow2"]


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass
class BlockLUT:
    q_mode: int          # 0 linear, 1 win2d
    k_mode: int
    QS: int              # linear: tokens per query tile
    BM: int              # query tile rows (pow2)
    QX: int              # win2d: query tile width (pow2); BM = QY * QX
    KS: int              # linear: tokens per key tile
    KSY: int             # win2d: key tile span (rows, cols) and pow2 tile dims
    KSX: int
    KTY: int
    KTX: int
    BN: int
    ntx: int             # win2d: key tiles per row
    ay: int              # win2d: key tile grid anchor (tile 0 starts at -ay, -ax)
    ax: int
    nQB: int
    nKB: int
    kv_num: torch.Tensor     # (LB, LH, nQB) int32  partial key tiles per query tile
    kv_idx: torch.Tensor     # (LB, LH, nQB, MAXK)
    full_num: torch.Tensor
    full_idx: torch.Tensor
    q_num: torch.Tensor      # (LB, LH, nKB) transposed (dK/dV)
    q_idx: torch.Tensor
    fq_num: torch.Tensor
    fq_idx: torch.Tensor
    k_pad: bool              # key tiles have padded / out-of-range slots even when "full"

    def kept_pairs(self, B, H) -> int:
        """Number of (query tile, key tile) pairs computed, summed over batch and heads."""
        n = (self.kv_num.long() + self.full_num.long()).sum() * (B // self.kv_num.shape[0]) \
            * (H // self.kv_num.shape[1])
        return int(n)


def _lists(C, val):
    sel = C == val
    num = sel.sum(-1).to(torch.int32)
    m = max(1, int(num.max()) if num.numel() else 1)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[..., :m]
    return num.contiguous(), order.to(torch.int32).contiguous()


def _from_matrix(C, **geo):
    kv_num, kv_idx = _lists(C, 1)
    full_num, full_idx = _lists(C, 2)
    Ct = C.transpose(-1, -2)
    q_num, q_idx = _lists(Ct, 1)
    fq_num, fq_idx = _lists(Ct, 2)
    return BlockLUT(kv_num=kv_num, kv_idx=kv_idx, full_num=full_num, full_idx=full_idx, q_num=q_num,
                    q_idx=q_idx, fq_num=fq_num, fq_idx=fq_idx, nQB=C.shape[-2], nKB=C.shape[-1], **geo)


def _span_choice(block, win, cap=16):
    """Key tile span along one axis: a divisor of `block` (so windows stay aligned to the grid),
    minimising padded keys plus a per-tile overhead."""
    best = None
    for s in range(1, min(block, cap) + 1):
        if block % s:
            continue
        cost = math.ceil(win / s) * (next_pow2(s) + 2)
        if best is None or cost < best[0] or (cost == best[0] and s > best[1]):
            best = (cost, s)
    return best[1]


def _linear_geo(span_q, span_k, Lq, Lk):
    BM, BN = max(16, next_pow2(span_q)), max(16, next_pow2(span_k))
    return dict(q_mode=0, k_mode=0, QS=span_q, BM=BM, QX=1, KS=span_k, KSY=1, KSX=1, KTY=1, KTX=1, BN=BN,
                ntx=1, ay=0, ax=0, k_pad=(span_k != BN) or (Lk % span_k != 0))


def build_lut(layout, Lq: int, Lk: int, device, block_m: int = 64, block_n: int = 64,
              tile_cap: int = 16) -> BlockLUT:
    """LUT for `layout` (None = dense). block_m/block_n: token spans of linear tiles."""
    key = (Lq, Lk, str(device), block_m, block_n, tile_cap)
    cache = getattr(layout, "_lut_cache", None) if layout is not None else None
    if cache is not None and key in cache:
        return cache[key]
    lut = _build(layout, Lq, Lk, device, block_m, block_n, tile_cap)
    if layout is not None:
        if cache is None:
            cache = {}
            try:
                layout._lut_cache = cache
            except AttributeError:  # pragma: no cover
                pass
        cache[key] = lut
    return lut


def _build(layout, Lq, Lk, dev, block_m, block_n, tile_cap):
    if isinstance(layout, WindowLayout):
        return _window(layout, dev, tile_cap)
    if isinstance(layout, RoutedLayout):
        S = layout.region_size
        geo = _linear_geo(S, S, Lq, Lk)
        geo["k_pad"] = S != geo["BN"]
        idx = layout.topk_index.to(dev)
        B, Hk, nR, k = idx.shape
        C = torch.zeros(B, Hk, nR, nR, dtype=torch.int8, device=dev)
        C.scatter_(-1, idx, 1 if layout.kv_valid is not None else 2)   # duplicates collapse here
        return _from_matrix(C, **geo)
    bm = min(block_m, max(16, next_pow2(Lq)))
    bn = min(block_n, max(16, next_pow2(Lk)))
    geo = _linear_geo(bm, bn, Lq, Lk)
    nQB, nKB = -(-Lq // bm), -(-Lk // bn)
    qs = torch.arange(nQB, device=dev) * bm
    qe = torch.clamp(qs + bm, max=Lq)            # exclusive
    ks = torch.arange(nKB, device=dev) * bn
    ke = torch.clamp(ks + bn, max=Lk)
    clean = (ke - ks == bn)[None, :]             # key tile fully in range
    if layout is None:
        C = torch.where(clean, 2, 1).to(torch.int8).expand(nQB, nKB)[None, None].contiguous()
        return _from_matrix(C, **geo)
    if isinstance(layout, CausalLayout):
        off, P = layout.offset, layout.prefix
        i0, i1 = (qs + off)[:, None], (qe - 1 + off)[:, None]
        j0, j1 = ks[None, :], (ke - 1)[None, :]
        anyc = (j0 <= i1) | ((i0 < P) & (j0 < P))
        allc = (j1 <= i0) | ((i1 < P) & (j1 < P))
        full = allc & clean & (layout.kv_valid is None)
        C = torch.where(full, 2, torch.where(anyc, 1, 0)).to(torch.int8)[None, None]
        return _from_matrix(C.contiguous(), **geo)
    if isinstance(layout, SegmentLayout):
        big = torch.iinfo(torch.int64).max

        def ranges(ids, span, n, L):
            B = ids.shape[0]
            pad = n * span - L
            x = torch.nn.functional.pad(ids.to(dev), (0, pad), value=-1).view(B, n, span)
            valid = x >= 0
            mn = torch.where(valid, x, torch.full_like(x, big)).amin(-1)
            mx = torch.where(valid, x, torch.full_like(x, -1)).amax(-1)
            return mn, mx, valid.all(-1)

        qmn, qmx, qall = ranges(layout.q_ids, bm, nQB, Lq)
        kmn, kmx, kall = ranges(layout.kv_ids, bn, nKB, Lk)
        anyc = (qmn[:, :, None] <= kmx[:, None, :]) & (kmn[:, None, :] <= qmx[:, :, None])
        full = (qall & (qmn == qmx))[:, :, None] & (kall & (kmn == kmx))[:, None, :] \
            & (qmn[:, :, None] == kmn[:, None, :]) & clean
        C = torch.where(full, 2, torch.where(anyc, 1, 0)).to(torch.int8)[:, None]
        return _from_matrix(C.contiguous(), **geo)
    if isinstance(layout, MaskLayout):
        m = layout.mask.to(dev)
        Bm, Hm = m.shape[:2]
        m = torch.nn.functional.pad(m, (0, nKB * bn - Lk, 0, nQB * bm - Lq))
        m = m.view(Bm, Hm, nQB, bm, nKB, bn)
        anyc = m.any(5).any(3)
        allc = m.all(5).all(3) & clean
        C = torch.where(allc, 2, torch.where(anyc, 1, 0)).to(torch.int8)
        return _from_matrix(C.contiguous(), **geo)
    raise TypeError(f"no LUT for layout {type(layout).__name__}")


def _window(lay: WindowLayout, dev, tile_cap):
    bq = lay.bq
    QX = next_pow2(bq)
    QY = max(next_pow2(bq), -(-16 // QX))
    zero = lay.border == "zero"
    KSY = _span_choice(lay.block, lay.win_h, tile_cap)
    KSX = _span_choice(lay.block, lay.win_w, tile_cap)
    KTY, KTX = next_pow2(KSY), next_pow2(KSX)
    while KTY * KTX < 16:
        KTY *= 2
    ay = ax = lay.halo if zero else 0
    ext_h = lay.h + (2 * lay.halo if zero else 0)
    ext_w = lay.w + (2 * lay.halo if zero else 0)
    nty, ntx = -(-ext_h // KSY), -(-ext_w // KSX)
    sy, sx = lay.starts(dev)

    def axis(starts, size, n, span, anchor, L):
        t0 = torch.arange(n, device=dev) * span - anchor
        t1 = t0 + span
        s0, s1 = starts[:, None], (starts + size)[:, None]
        overlap = (t0[None] < s1) & (t1[None] > s0)
        inside = (t0[None] >= s0) & (t1[None] <= s1)
        if not zero:
            inside = inside & (t0[None] >= 0) & (t1[None] <= L)
        return overlap, inside

    oy, iy = axis(sy, lay.win_h, nty, KSY, ay, lay.h)
    ox, ix = axis(sx, lay.win_w, ntx, KSX, ax, lay.w)
    overlap = oy[:, None, :, None] & ox[None, :, None, :]
    inside = iy[:, None, :, None] & ix[None, :, None, :]
    if lay.kv_valid is not None:
        inside = torch.zeros_like(inside)
    C = torch.where(inside, 2, torch.where(overlap, 1, 0)).to(torch.int8)
    C = C.reshape(lay.nby * lay.nbx, nty * ntx)[None, None].contiguous()
    geo = dict(q_mode=1, k_mode=1, QS=bq, BM=QY * QX, QX=QX, KS=1, KSY=KSY, KSX=KSX, KTY=KTY, KTX=KTX,
               BN=KTY * KTX, ntx=ntx, ay=ay, ax=ax, k_pad=True)
    return _from_matrix(C, **geo)
