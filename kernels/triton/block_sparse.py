"""Triton block-sparse flash attention, forward and backward, on the block LUTs of kernels/lut.py.

Grid (query tile, batch·head) for the forward and dQ kernels, (key tile, batch·head) for dK/dV
(walking the transposed LUT, so no atomics on dK/dV). Per tile pair: logits = scale·q·kᵀ, GMM
score mod, additive bias (dense / indexed table / decomposed rel-pos), then in *partial* tiles the
element predicate (window membership incl. virtual border keys, kv_valid, segment ids, causal,
dense-mask bits). Online softmax in base 2 with fp32 statistics. Bias-table, rel-pos and GMM
parameter gradients use fp32 atomics in the dQ kernel; a dense bias gets its dS tile stored.

A launch reads as: tensors as `Rows` bundles (Q, K, V, O, ...), the LUT as two `TileList`s
(partial, full), then `Dims`, the layout's runtime `Geometry`, its element `Predicates`, the
`Modifiers` (and `ModGrads` for dQ), and two constexpr bundles: `Tiles` (tile shape, token maps,
dot dtype) and `Features` (which predicates and modifiers are compiled in); all defined in
bundles.py. A switched-off predicate or modifier keeps a neutral bundle (dummy pointers, zero
strides).

The host side knows no layout or modifier types: `_Plan` starts from the neutral bundles and lets
the layout (`Layout.triton_args`, `Layout.block_lut`) and each modifier (`Modifier.triton_args`,
`triton_grad_buffers`, `triton_grads`) fill the slots they lower to.

Only plain `tl.load/store/dot/atomic_add` are used so the same code runs on triton 3.6 and 3.8 and
under TRITON_INTERPRET=1 (tests run the kernels on CPU tensors that way; no bf16 there).
"""
from typing import List, Tuple

import torch

from ..lut import build_lut
from ._common import (HAS_TRITON, bs, call_reason, constexprs, contig, load_tile, pow2_at_least_16, row_base, rows,
                      store_tile, tl, triton)
from .bundles import (SWITCHES, Dims, Features, ModGrads, Modifiers, ParamGrads, Predicates, TileList, Tiles, neutral,
                      neutral_grads)

__all__ = ["can_run", "run", "TILE_OPTIONS"]

NAME = "triton"
# linear tile spans (dense / causal / segments / mask); tests shrink them to get few programs
TILE_OPTIONS = {"block_m": 64, "block_n": 64}


def can_run(q, k, v, layout, mods, dropout_p):
    why = call_reason(q, k, v, "triton", "the block-sparse Triton kernel", layout, mods, dropout_p)
    return not why, why


if HAS_TRITON:

    @triton.jit
    def _qmap(qb, dims, geo, tile, feat):
        """Query tile -> (natural token, validity, local ly, lx, window start sy, sx) per row."""
        offs_m = tl.arange(0, tile.BM)
        if tile.Q_MODE == 0:
            tok = qb * tile.QS + offs_m
            valid = (offs_m < tile.QS) & (tok < dims.Lq)
            ly = offs_m * 0
            lx = offs_m * 0
            sy = qb * 0
            sx = qb * 0
        else:
            by = qb // geo.nbx
            bx = qb % geo.nbx
            ly = offs_m // tile.QX
            lx = offs_m % tile.QX
            valid = (ly < geo.bq) & (lx < geo.bq)
            tok = (by * geo.bq + ly) * geo.wq + bx * geo.bq + lx
            sy = by * geo.block - geo.halo
            sx = bx * geo.block - geo.halo
            if feat.CLAMP:
                sy = tl.minimum(tl.maximum(sy, 0), tl.maximum(geo.mh - geo.win_h, 0))
                sx = tl.minimum(tl.maximum(sx, 0), tl.maximum(geo.mw - geo.win_w, 0))
        tok = tl.where(valid, tok, 0)
        return tok, valid, ly, lx, sy, sx

    @triton.jit
    def _kmap(kb, dims, geo, tile):
        """Key tile -> (natural token, loadable (in range / in map), real slot, map ky, kx) per slot."""
        offs_n = tl.arange(0, tile.BN)
        if tile.K_MODE == 0:
            tok = kb * tile.KS + offs_n
            span = offs_n < tile.KS
            inb = span & (tok < dims.Lk)
            ky = offs_n * 0
            kx = offs_n * 0
        else:
            ty = kb // geo.ntx
            tx = kb % geo.ntx
            cy = offs_n // tile.KTX
            cx = offs_n % tile.KTX
            span = (cy < tile.KSY) & (cx < tile.KSX)
            ky = ty * tile.KSY - geo.ay + cy
            kx = tx * tile.KSX - geo.ax + cx
            inb = span & (ky >= 0) & (ky < geo.mh) & (kx >= 0) & (kx < geo.mw)
            tok = ky * geo.mw + kx
        tok = tl.where(inb, tok, 0)
        return tok, inb, span, ky, kx

    @triton.jit
    def _list_len(lst, b, h, i):
        """Number of tiles tile `i` pairs with in a `TileList`."""
        return tl.load(lst.num + b * lst.n_sb + h * lst.n_sh + i)

    @triton.jit
    def _list_item(lst, b, h, i, t):
        return tl.load(lst.idx + b * lst.i_sb + h * lst.i_sh + i * lst.i_st + t)

    @triton.jit
    def _pair_ptrs(pm, b, h, tq, tk):
        """Pointers to the (query, key) elements of a `PairMap`."""
        return pm.ptr + b * pm.s_b + h * pm.s_h + tq[:, None] * pm.s_i + tk[None, :] * pm.s_j

    @triton.jit
    def _program(dims):
        """(tile index, b·H + h, batch, head) of this program (grid: tiles x batch·heads)."""
        bh = tl.program_id(1)
        return tl.program_id(0), bh, bh // dims.H, bh % dims.H

    @triton.jit
    def _query_tile(Q, b, h, qb, dims, geo, tile, feat):
        """Query tile qb: its row positions (`_qmap`) and q (BM, DP)."""
        qpos = _qmap(qb, dims, geo, tile, feat)
        return qpos, load_tile(Q, b, h, qpos[0], qpos[1], tl.arange(0, tile.DP), dims.D)

    @triton.jit
    def _key_tile(K, V, b, h, kb, dims, geo, tile):
        """Key tile kb: its slot positions (`_kmap`), k (BN, DP) and v (BN, DVP)."""
        kpos = _kmap(kb, dims, geo, tile)
        kt = load_tile(K, b, h, kpos[0], kpos[1], tl.arange(0, tile.DP), dims.D)
        vt = load_tile(V, b, h, kpos[0], kpos[1], tl.arange(0, tile.DVP), dims.Dv)
        return kpos, kt, vt

    @triton.jit
    def _grad_rows(DO, LSE, DELTA, b, h, bh, qpos, dims, tile):
        """What the backward needs per query row (bh = b·H + h): dO (BM, DVP), the log-sum-exp (0
        for rows without keys: their p are 0) and delta = rowsum(dO·O)."""
        tq, qv = qpos[0], qpos[1]
        do = load_tile(DO, b, h, tq, qv, tl.arange(0, tile.DVP), dims.Dv)
        lse = tl.load(LSE + bh * dims.Lq + tq, mask=qv, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + bh * dims.Lq + tq, mask=qv, other=0.0)
        return do, lse, delta

    @triton.jit
    def _gmm_m(tq, tk, kin, h, gmm, feat):
        """GMM score modulation m of a tile (multiplied or added), the squared grid distance and
        which pairs it applies to."""
        h_a = h * gmm.a_sh
        qp = tq - gmm.prefix
        kp = tk - gmm.prefix
        dy = (qp // gmm.grid_w)[:, None] - (kp // gmm.grid_w)[None, :]
        dx = (qp % gmm.grid_w)[:, None] - (kp % gmm.grid_w)[None, :]
        d2 = (dy * dy + dx * dx).to(tl.float32)
        mod = (qp >= 0)[:, None] & ((kp >= 0) & kin)[None, :]
        m = tl.zeros(d2.shape, dtype=tl.float32)
        for c in tl.static_range(feat.NK):
            a = tl.load(gmm.alpha + h_a * feat.NK + c).to(tl.float32)
            sg = tl.load(gmm.sigma + h_a * feat.NK + c).to(tl.float32)
            m += a * tl.exp(-d2 / (2.0 * sg * sg))
        if feat.GADD:
            m = tl.where(mod, m, 0.0)
        else:
            m = tl.where(mod, m, 1.0)
        return m, d2, mod

    @triton.jit
    def _logits(qk, b, h, qpos, kpos, dims, geo, pred, mods, tile, feat, PARTIAL: tl.constexpr):
        """Scaled logits of one tile pair with the modifiers applied and, in partial tiles, the
        layout's element predicate (-inf where a pair is not attended)."""
        tq, qv, ly, lx, sy, sx = qpos
        tk, kin, kspan, ky, kx = kpos
        s = qk * dims.scale
        if feat.GMM:
            m, d2, mod = _gmm_m(tq, tk, kin, h, mods.gmm, feat)
            if feat.GADD:
                s = s + m
            else:
                s = s * m
        pair = qv[:, None] & kin[None, :]
        if feat.BIAS == 1:
            bv = tl.load(_pair_ptrs(mods.bias, b, h, tq, tk), mask=pair, other=0.0)
            s += bv.to(tl.float32)
        if feat.BIAS == 2:
            tab = mods.table
            iv = tl.load(_pair_ptrs(tab.index, b, h, tq, tk), mask=pair, other=0)
            tv = tl.load(tab.table.ptr + h * tab.table.s_h + iv, mask=pair, other=0.0)
            s += tv.to(tl.float32)
        if feat.BIAS == 3:
            rp = mods.relpos
            if feat.RP_WIN:
                iy = (ky - sy)[None, :] - ly[:, None] + rp.grid.Rh // 2
                ix = (kx - sx)[None, :] - lx[:, None] + rp.grid.Rw // 2
            else:
                iy = (tk // rp.grid.kgw)[None, :] - (tq // rp.grid.qgw)[:, None] + rp.grid.Rh // 2
                ix = (tk % rp.grid.kgw)[None, :] - (tq % rp.grid.qgw)[:, None] + rp.grid.Rw // 2
            okh = qv[:, None] & kspan[None, :] & (iy >= 0) & (iy < rp.grid.Rh)
            okw = qv[:, None] & kspan[None, :] & (ix >= 0) & (ix < rp.grid.Rw)
            if not feat.RP_WIN:
                okh = okh & kin[None, :]
                okw = okw & kin[None, :]
            rv = tl.load(row_base(rp.rh, b, h) + tq[:, None] * rp.rh.s_n + iy, mask=okh, other=0.0)
            rv2 = tl.load(row_base(rp.rw, b, h) + tq[:, None] * rp.rw.s_n + ix, mask=okw, other=0.0)
            s += rv.to(tl.float32) + rv2.to(tl.float32)
        if PARTIAL:
            keep = qv[:, None] & kspan[None, :]
            if tile.K_MODE == 0:
                keep = keep & kin[None, :]
            if feat.WIN:
                inw = (ky >= sy) & (ky < sy + geo.win_h) & (kx >= sx) & (kx < sx + geo.win_w)
                if feat.CLAMP:
                    inw = inw & kin
                keep = keep & inw[None, :]
            if feat.HAS_KVV:
                kvv = tl.load(pred.kv_valid.ptr + b * pred.kv_valid.s_b + tk, mask=kin, other=1)
                keep = keep & (kvv != 0)[None, :]
            if feat.HAS_SEG:
                seg = pred.segments
                qi = tl.load(seg.q_ids + b * seg.q_sb + tq, mask=qv, other=-1)
                ki = tl.load(seg.kv_ids + b * seg.kv_sb + tk, mask=kin, other=-2)
                keep = keep & (qi[:, None] == ki[None, :]) & (qi >= 0)[:, None]
            if feat.CAUSAL:
                ii = tq + pred.causal.offset
                cp = pred.causal.prefix
                keep = keep & ((tk[None, :] <= ii[:, None]) | ((ii < cp)[:, None] & (tk < cp)[None, :]))
            if feat.HAS_MASK:
                mv = tl.load(_pair_ptrs(pred.mask, b, h, tq, tk), mask=pair, other=0)
                keep = keep & (mv != 0)
            s = tl.where(keep, s, float("-inf"))
        else:
            if tile.K_PAD:
                if tile.K_MODE == 0:
                    s = tl.where(kin[None, :], s, float("-inf"))
                else:
                    s = tl.where(kspan[None, :], s, float("-inf"))
        return s

    @triton.jit
    def _fwd_tiles(acc, m_i, l_i, q, b, h, qb, qpos, lst, K, V, dims, geo, pred, mods, tile, feat,
                   PARTIAL: tl.constexpr):
        """Online softmax (base 2, fp32 statistics) over the key tiles of one LUT list."""
        for t in range(0, _list_len(lst, b, h, qb)):
            kpos, kt, vt = _key_tile(K, V, b, h, _list_item(lst, b, h, qb, t), dims, geo, tile)
            qk = tl.dot(q, tl.trans(kt), input_precision=tile.PREC)
            s = _logits(qk, b, h, qpos, kpos, dims, geo, pred, mods, tile, feat, PARTIAL)
            s2 = s * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s2 - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tile.DOT_DTYPE), vt, input_precision=tile.PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, part, full, dims, geo, pred, mods, tile, feat):
        """One query tile of one (batch, head): its partial key tiles, then its full ones."""
        qb, bh, b, h = _program(dims)
        qpos, q = _query_tile(Q, b, h, qb, dims, geo, tile, feat)
        m_i = tl.full([tile.BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([tile.BM], dtype=tl.float32)
        acc = tl.zeros([tile.BM, tile.DVP], dtype=tl.float32)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, b, h, qb, qpos, part, K, V, dims, geo, pred, mods, tile, feat,
                                   True)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, b, h, qb, qpos, full, K, V, dims, geo, pred, mods, tile, feat,
                                   False)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        store_tile(O, b, h, qpos[0], qpos[1], tl.arange(0, tile.DVP), dims.Dv, out)
        tl.store(LSE + bh * dims.Lq + qpos[0], lse, mask=qpos[1])

    @triton.jit
    def _dkdv_tiles(dk, dv, kt, vt, b, h, kb, kpos, lst, Q, DO, LSE, DELTA, dims, geo, pred, mods, tile, feat,
                    PARTIAL: tl.constexpr):
        """dK, dV contributions of the query tiles of one transposed LUT list."""
        bh = b * dims.H + h
        for t in range(0, _list_len(lst, b, h, kb)):
            qpos, q = _query_tile(Q, b, h, _list_item(lst, b, h, kb, t), dims, geo, tile, feat)
            do, lse, delta = _grad_rows(DO, LSE, DELTA, b, h, bh, qpos, dims, tile)
            qk = tl.dot(q, tl.trans(kt), input_precision=tile.PREC)
            s = _logits(qk, b, h, qpos, kpos, dims, geo, pred, mods, tile, feat, PARTIAL)
            p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
            p = tl.where(qpos[1][:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(tile.DOT_DTYPE)), do, input_precision=tile.PREC)
            dp = tl.dot(do, tl.trans(vt), input_precision=tile.PREC)
            ds = p * (dp - delta[:, None])
            if feat.GMM:
                if not feat.GADD:
                    m, d2, mod = _gmm_m(qpos[0], kpos[0], kpos[1], h, mods.gmm, feat)
                    ds = ds * m
            dk += tl.dot(tl.trans((ds * dims.scale).to(tile.DOT_DTYPE)), q, input_precision=tile.PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, part, full, dims, geo, pred, mods, tile,
                       feat):
        """dK, dV of one key tile of one (batch, head), walking the transposed LUT (no atomics)."""
        kb, bh, b, h = _program(dims)
        kpos, kt, vt = _key_tile(K, V, b, h, kb, dims, geo, tile)
        dk = tl.zeros([tile.BN, tile.DP], dtype=tl.float32)
        dv = tl.zeros([tile.BN, tile.DVP], dtype=tl.float32)
        dk, dv = _dkdv_tiles(dk, dv, kt, vt, b, h, kb, kpos, part, Q, DO, LSE, DELTA, dims, geo, pred, mods, tile,
                             feat, True)
        dk, dv = _dkdv_tiles(dk, dv, kt, vt, b, h, kb, kpos, full, Q, DO, LSE, DELTA, dims, geo, pred, mods, tile,
                             feat, False)
        store_tile(DK, b, h, kpos[0], kpos[1], tl.arange(0, tile.DP), dims.D, dk)
        store_tile(DV, b, h, kpos[0], kpos[1], tl.arange(0, tile.DVP), dims.Dv, dv)

    @triton.jit
    def _dq_tiles(dq, ga, gs, q, do, lse, delta, b, h, qb, qpos, lst, K, V, G, dims, geo, pred, mods, tile, feat,
                  PARTIAL: tl.constexpr):
        """dQ over the key tiles of one LUT list, with the modifiers' parameter gradients (GMM
        into ga/gs, bias / table / rel-pos into the buffers of G)."""
        tq, qv, ly, lx, sy, sx = qpos
        for t in range(0, _list_len(lst, b, h, qb)):
            kb = _list_item(lst, b, h, qb, t)
            kpos, kt, vt = _key_tile(K, V, b, h, kb, dims, geo, tile)
            tk, kin = kpos[0], kpos[1]
            qk = tl.dot(q, tl.trans(kt), input_precision=tile.PREC)
            s = _logits(qk, b, h, qpos, kpos, dims, geo, pred, mods, tile, feat, PARTIAL)
            p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
            p = tl.where(qv[:, None], p, 0.0)
            dp = tl.dot(do, tl.trans(vt), input_precision=tile.PREC)
            ds = p * (dp - delta[:, None])
            dsq = ds
            if feat.GMM:
                gmm = mods.gmm
                m, d2, mod = _gmm_m(tq, tk, kin, h, gmm, feat)
                offs_k = tl.arange(0, feat.KP)
                if feat.GADD:
                    base = ds
                else:
                    base = ds * (qk * dims.scale)
                    dsq = ds * m
                base = tl.where(mod, base, 0.0)
                for c in tl.static_range(feat.NK):
                    a = tl.load(gmm.alpha + h * gmm.a_sh * feat.NK + c).to(tl.float32)
                    sg = tl.load(gmm.sigma + h * gmm.a_sh * feat.NK + c).to(tl.float32)
                    g = tl.exp(-d2 / (2.0 * sg * sg))
                    ca = tl.sum(tl.sum(base * g, 1), 0)
                    cs = tl.sum(tl.sum(base * g * d2, 1), 0) * a / (sg * sg * sg)
                    ga += tl.where(offs_k == c, ca, 0.0)
                    gs += tl.where(offs_k == c, cs, 0.0)
            dq += tl.dot((dsq * dims.scale).to(tile.DOT_DTYPE), kt, input_precision=tile.PREC)
            pair = qv[:, None] & kin[None, :]
            if feat.BIAS == 1:
                ptrs = _pair_ptrs(G.dbias, b, h, tq, tk)
                if feat.DB_ATOMIC:
                    tl.atomic_add(ptrs, ds, mask=pair)
                else:
                    tl.store(ptrs, ds, mask=pair)
            if feat.BIAS == 2:
                tab = mods.table
                iv = tl.load(_pair_ptrs(tab.index, b, h, tq, tk), mask=pair, other=0)
                tl.atomic_add(G.params.dtable + h * tab.table.s_h + iv, ds, mask=pair)
            if feat.BIAS == 3:
                rp = mods.relpos
                drh = G.params.drh + b * rp.rh.s_b + h * rp.rh.s_h + tq[:, None] * rp.rh.s_n
                drw = G.params.drw + b * rp.rw.s_b + h * rp.rw.s_h + tq[:, None] * rp.rw.s_n
                if feat.RP_WIN:
                    ds3 = tl.reshape(ds, (tile.BM, tile.KTY, tile.KTX))
                    dh = tl.sum(ds3, 2)
                    dw = tl.sum(ds3, 1)
                    ty = kb // geo.ntx
                    tx = kb % geo.ntx
                    ry = ty * tile.KSY - geo.ay + tl.arange(0, tile.KTY)
                    rx = tx * tile.KSX - geo.ax + tl.arange(0, tile.KTX)
                    iy = (ry - sy)[None, :] - ly[:, None] + rp.grid.Rh // 2
                    ix = (rx - sx)[None, :] - lx[:, None] + rp.grid.Rw // 2
                    okh = qv[:, None] & (tl.arange(0, tile.KTY) < tile.KSY)[None, :] & (iy >= 0) & (iy < rp.grid.Rh)
                    okw = qv[:, None] & (tl.arange(0, tile.KTX) < tile.KSX)[None, :] & (ix >= 0) & (ix < rp.grid.Rw)
                    tl.atomic_add(drh + iy, dh, mask=okh)
                    tl.atomic_add(drw + ix, dw, mask=okw)
                else:
                    iy = (tk // rp.grid.kgw)[None, :] - (tq // rp.grid.qgw)[:, None] + rp.grid.Rh // 2
                    ix = (tk % rp.grid.kgw)[None, :] - (tq % rp.grid.qgw)[:, None] + rp.grid.Rw // 2
                    okh = pair & (iy >= 0) & (iy < rp.grid.Rh)
                    okw = pair & (ix >= 0) & (ix < rp.grid.Rw)
                    tl.atomic_add(drh + iy, ds, mask=okh)
                    tl.atomic_add(drw + ix, ds, mask=okw)
        return dq, ga, gs

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, part, full, G, dims, geo, pred, mods, tile,
                     feat):
        """dQ of one query tile of one (batch, head); the modifiers' parameter gradients by atomics."""
        qb, bh, b, h = _program(dims)
        qpos, q = _query_tile(Q, b, h, qb, dims, geo, tile, feat)
        do, lse, delta = _grad_rows(DO, LSE, DELTA, b, h, bh, qpos, dims, tile)
        dq = tl.zeros([tile.BM, tile.DP], dtype=tl.float32)
        ga = tl.zeros([feat.KP], dtype=tl.float32)
        gs = tl.zeros([feat.KP], dtype=tl.float32)
        dq, ga, gs = _dq_tiles(dq, ga, gs, q, do, lse, delta, b, h, qb, qpos, part, K, V, G, dims, geo, pred, mods,
                               tile, feat, True)
        dq, ga, gs = _dq_tiles(dq, ga, gs, q, do, lse, delta, b, h, qb, qpos, full, K, V, G, dims, geo, pred, mods,
                               tile, feat, False)
        store_tile(DQ, b, h, qpos[0], qpos[1], tl.arange(0, tile.DP), dims.D, dq)
        if feat.GMM:
            offs_k = tl.arange(0, feat.KP)
            a_off = h * mods.gmm.a_sh * feat.NK + offs_k
            tl.atomic_add(G.params.dalpha + a_off, ga, mask=offs_k < feat.NK)
            tl.atomic_add(G.params.dsigma + a_off, gs, mask=offs_k < feat.NK)


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------
def _tile_list(num, idx) -> TileList:
    return TileList(num, bs(num, 0), bs(num, 1), idx, bs(idx, 0), bs(idx, 1), idx.stride(2))


def _fill(slots: dict, switches: dict, lowered: dict):
    """Put a lowering's bundles into `slots` and the switches they turn on into `switches`."""
    for name, value in lowered.items():
        if name == "features":
            switches.update(value)
            continue
        if name not in slots:
            raise KeyError(f"triton lowering filled an unknown slot {name!r}; slots: {sorted(slots)}")
        slots[name] = value
        if name in SWITCHES:
            switches[SWITCHES[name][0]] = SWITCHES[name][1]


class _Plan:
    """Everything a launch needs: the LUT and the kernels' argument bundles."""

    def __init__(self, q, k, v, layout, scale, mods):
        B, H, Lq, D = q.shape
        Lk, Dv = k.shape[2], v.shape[3]
        dev = q.device
        self.B, self.H, self.Lq, self.Lk, self.Dv = B, H, Lq, Lk, Dv
        self.mods = list(mods)
        # Tiles that also evaluate a bias, the GMM mod or mask bits, or wide heads, need more
        # registers: at 64x64 with 4 warps ptxas spilled 100-1600 bytes per thread on sm_90. Those
        # variants get 8 warps and, with linear tiles, 32-key tiles (spill-free for D <= 64).
        heavy = bool(mods) or (layout is not None and layout.heavy_predicate) or max(D, Dv) > 64
        linear = layout is None or layout.linear_tiles
        block_n = min(TILE_OPTIONS["block_n"], 32) if heavy and linear else TILE_OPTIONS["block_n"]
        lut = build_lut(layout, Lq, Lk, dev, TILE_OPTIONS["block_m"], block_n)
        self.lut = lut
        slots, switches = neutral(dev), {}
        if layout is not None:
            _fill(slots, switches, layout.triton_args(dev))
        self.mod_args = [m.triton_args(layout, dev) for m in self.mods]
        for lowered in self.mod_args:
            _fill(slots, switches, lowered)
        self.dims = Dims(Lq, Lk, H, D, Dv, float(scale))
        self.geo = slots["geometry"]._replace(ntx=lut.ntx, ay=lut.ay, ax=lut.ax)
        self.pred = Predicates(*(slots[f] for f in Predicates._fields))
        self.modifiers = Modifiers(*(slots[f] for f in Modifiers._fields))
        DP, DVP = pow2_at_least_16(D), pow2_at_least_16(Dv)
        dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32)
        self.tiles = Tiles(Q_MODE=lut.q_mode, QS=lut.QS, QX=lut.QX, K_MODE=lut.k_mode, KS=lut.KS, KSY=lut.KSY,
                           KSX=lut.KSX, KTY=lut.KTY, KTX=lut.KTX, K_PAD=bool(lut.k_pad), BM=lut.BM, BN=lut.BN,
                           DP=DP, DVP=DVP, DOT_DTYPE=dot_dtype, PREC="ieee" if q.dtype == torch.float32 else "tf32")
        self.features = Features(**switches)
        # wide heads and heavy tiles: fewer pipeline stages (shared memory, registers)
        self.launch = dict(num_warps=8 if heavy and lut.BM * lut.BN >= 64 * 32 else 4,
                           num_stages=2 if max(DP, DVP) >= 128 or heavy else 3)

    def tile_lists(self, transposed=False):
        """(partial, full) lists per query tile, or per key tile when `transposed` (dK/dV)."""
        L = self.lut
        if not transposed:
            return _tile_list(L.kv_num, L.kv_idx), _tile_list(L.full_num, L.full_idx)
        return _tile_list(L.q_num, L.q_idx), _tile_list(L.fq_num, L.fq_idx)

    def layout_args(self):
        return self.dims, self.geo, self.pred, self.modifiers

    def grad_buffers(self, shape, device):
        """(ModGrads, Features with the gradients' switches, each modifier's buffers)."""
        g, switches, per_mod = neutral_grads(device), {}, []
        for m, lowered in zip(self.mods, self.mod_args):
            bufs = m.triton_grad_buffers(lowered, shape, device)
            switches.update(bufs.get("features", {}))
            unknown = set(bufs) - set(g) - {"features"}
            if unknown:
                raise KeyError(f"{type(m).__name__}.triton_grad_buffers filled unknown slots {sorted(unknown)}; "
                               f"slots: {sorted(g)}")
            g.update((name, t) for name, t in bufs.items() if name != "features")
            per_mod.append(bufs)
        grads = ModGrads(g["dbias"], ParamGrads(*(g[f] for f in ParamGrads._fields)))
        return grads, self.features._replace(**switches), per_mod


def _fwd(plan: _Plan, q, k, v):
    B, H, Lq = plan.B, plan.H, plan.Lq
    out = torch.empty(B, H, Lq, plan.Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    _attn_fwd[(plan.lut.nQB, B * H)](rows(q), rows(k), rows(v), rows(out), lse, *plan.tile_lists(),
                                     *plan.layout_args(), constexprs(plan.tiles), constexprs(plan.features), **plan.launch)
    return out, lse


def _bwd(plan: _Plan, dout, dlse, q, k, v, out, lse):
    B, H = plan.B, plan.H
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(lse))
    delta = delta.contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    Q, K, V, DO = rows(q), rows(k), rows(v), rows(dout)
    _attn_bwd_dkdv[(plan.lut.nKB, B * H)](Q, K, V, DO, lse, delta, rows(dk), rows(dv), *plan.tile_lists(True),
                                          *plan.layout_args(), constexprs(plan.tiles), constexprs(plan.features), **plan.launch)
    grads, feats, per_mod = plan.grad_buffers((B, H, plan.Lq, plan.Lk), q.device)
    _attn_bwd_dq[(plan.lut.nQB, B * H)](Q, K, V, DO, lse, delta, rows(dq), *plan.tile_lists(), grads,
                                        *plan.layout_args(), constexprs(plan.tiles), constexprs(feats), **plan.launch)
    fgrads = [g for m, bufs in zip(plan.mods, per_mod) for g in m.triton_grads(bufs)]
    return dq, dk, dv, fgrads


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, mods, *ftensors):
        plan = _Plan(q, k, v, layout, scale, mods)
        out, lse = _fwd(plan, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, fgrads = _bwd(ctx.plan, dout, dlse, q, k, v, out, lse)
        return (dq, dk, dv, None, None, None, *fgrads)


def run(q, k, v, layout, scale, mods, return_lse, dropout):
    """Backend entry (the router checked `can_run`; CUDA, or CPU under TRITON_INTERPRET=1)."""
    q, k, v = contig(q), contig(k), contig(v)
    if torch.compiler.is_compiling():
        from ..custom_op import flatten
        lt, fl, it, meta = flatten(layout, mods)
        return torch.ops.zoo.attention_triton(q, k, v, lt, fl, it, meta, float(scale))
    ftensors = [t for m in mods for t in m.tensors()]
    return _TritonAttention.apply(q, k, v, layout, scale, tuple(mods), *ftensors)


if HAS_TRITON:
    @torch.library.custom_op("zoo::attention_triton", mutates_args=())
    def _attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lt: List[torch.Tensor],
                             fl: List[torch.Tensor], it: List[torch.Tensor], meta: List[int], scale: float
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
        from ..custom_op import unflatten
        layout, mods, _ = unflatten(lt, fl, it, meta, as_list=True)
        return _fwd(_Plan(q, k, v, layout, scale, mods), q, k, v)

    @_attention_triton_op.register_fake
    def _(q, k, v, lt, fl, it, meta, scale):
        B, H, Lq, _ = q.shape
        return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=torch.float32)

    @torch.library.custom_op("zoo::attention_triton_bwd", mutates_args=())
    def _attention_triton_bwd_op(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, lt: List[torch.Tensor],
                                 fl: List[torch.Tensor], it: List[torch.Tensor], meta: List[int], scale: float
                                 ) -> List[torch.Tensor]:
        from ..custom_op import unflatten
        layout, mods, _ = unflatten(lt, fl, it, meta, as_list=True)
        dq, dk, dv, fgrads = _bwd(_Plan(q, k, v, layout, scale, mods), dout, dlse, q, k, v, out, lse)
        return [dq, dk, dv, *fgrads]

    @_attention_triton_bwd_op.register_fake
    def _(dout, dlse, q, k, v, out, lse, lt, fl, it, meta, scale):
        return [torch.empty_like(t) for t in (q, k, v, *fl)]

    def _setup(ctx, inputs, output):
        q, k, v, lt, fl, it, meta, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *lt, *fl, *it)
        ctx.n = (len(lt), len(fl), len(it))
        ctx.meta, ctx.scale = meta, scale

    def _backward(ctx, dout, dlse):
        saved = ctx.saved_tensors
        q, k, v, out, lse = saved[:5]
        a, b, c = ctx.n
        lt, fl, it = list(saved[5:5 + a]), list(saved[5 + a:5 + a + b]), list(saved[5 + a + b:])
        g = torch.ops.zoo.attention_triton_bwd(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, lt, fl, it,
                                               ctx.meta, ctx.scale)
        return g[0], g[1], g[2], [None] * a, list(g[3:]), [None] * c, None, None

    torch.library.register_autograd("zoo::attention_triton", _backward, setup_context=_setup)
