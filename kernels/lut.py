"""Block LUTs for the Triton kernels, in FlexAttention's format.

For every query tile: the partial key tiles (element predicate applied) and the full key tiles
(no predicate), `(num, idx[MAX])` each; and the transposed lists (per key tile: its query tiles)
that the dK/dV kernel walks. Pure torch, vectorised, cached on the layout object.

Each layout builds its own LUT (`Layout.block_lut`) from the helpers here; `build_lut` caches
it on the layout and builds the dense one. Token -> tile mapping ("modes"):
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

import torch

__all__ = ["BlockLUT", "build_lut", "next_pow2", "from_matrix", "linear_geo", "span_choice", "linear_tiles"]


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


def from_matrix(C, **geo):
    """LUT from a tile-class matrix C (LB, LH, nQB, nKB) int8: 0 skip, 1 partial, 2 full."""
    kv_num, kv_idx = _lists(C, 1)
    full_num, full_idx = _lists(C, 2)
    Ct = C.transpose(-1, -2)
    q_num, q_idx = _lists(Ct, 1)
    fq_num, fq_idx = _lists(Ct, 2)
    return BlockLUT(kv_num=kv_num, kv_idx=kv_idx, full_num=full_num, full_idx=full_idx, q_num=q_num,
                    q_idx=q_idx, fq_num=fq_num, fq_idx=fq_idx, nQB=C.shape[-2], nKB=C.shape[-1], **geo)


def span_choice(block, win, cap=16):
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


def linear_geo(span_q, span_k, Lq, Lk):
    BM, BN = max(16, next_pow2(span_q)), max(16, next_pow2(span_k))
    return dict(q_mode=0, k_mode=0, QS=span_q, BM=BM, QX=1, KS=span_k, KSY=1, KSX=1, KTY=1, KTX=1, BN=BN,
                ntx=1, ay=0, ax=0, k_pad=(span_k != BN) or (Lk % span_k != 0))


def linear_tiles(Lq, Lk, device, block_m, block_n):
    """Linear tile spans for (Lq, Lk): (geo, nQB, nKB, q starts, q ends, k starts, k ends, clean)
    where `clean` (1, nKB) marks key tiles fully in range."""
    bm = min(block_m, max(16, next_pow2(Lq)))
    bn = min(block_n, max(16, next_pow2(Lk)))
    geo = linear_geo(bm, bn, Lq, Lk)
    nQB, nKB = -(-Lq // bm), -(-Lk // bn)
    qs = torch.arange(nQB, device=device) * bm
    qe = torch.clamp(qs + bm, max=Lq)            # exclusive
    ks = torch.arange(nKB, device=device) * bn
    ke = torch.clamp(ks + bn, max=Lk)
    clean = (ke - ks == bn)[None, :]
    return geo, nQB, nKB, qs, qe, ks, ke, clean


def build_lut(layout, Lq: int, Lk: int, device, block_m: int = 64, block_n: int = 64,
              tile_cap: int = 16) -> BlockLUT:
    """LUT for `layout` (None = dense), cached on the layout. block_m/block_n: linear tile spans."""
    if layout is None:
        geo, nQB, nKB, qs, qe, ks, ke, clean = linear_tiles(Lq, Lk, device, block_m, block_n)
        C = torch.where(clean, 2, 1).to(torch.int8).expand(nQB, nKB)[None, None].contiguous()
        return from_matrix(C, **geo)
    key = (Lq, Lk, str(device), block_m, block_n, tile_cap)
    cache = layout.__dict__.setdefault("_lut_cache", {})
    if key not in cache:
        cache[key] = layout.block_lut(Lq, Lk, device, block_m, block_n, tile_cap)
    return cache[key]
