"""Triton block-sparse flash attention, forward and backward, on the block LUTs of kernels/lut.py.

Grid (query tile, batch·head) for the forward and dQ kernels, (key tile, batch·head) for dK/dV
(walking the transposed LUT, so no atomics on dK/dV). Per tile pair: logits = scale·q·kᵀ, GMM
score mod, additive bias (dense / indexed table / decomposed rel-pos), then in *partial* tiles the
element predicate (window membership incl. virtual border keys, kv_valid, segment ids, causal,
dense-mask bits). Online softmax in base 2 with fp32 statistics. Bias-table, rel-pos and GMM
parameter gradients use fp32 atomics in the dQ kernel; a dense bias gets its dS tile stored.

The host side knows no layout or modifier types: `_Plan` starts from neutral kernel arguments and
lets the layout (`Layout.triton_args`, `Layout.block_lut`) and each modifier
(`Modifier.triton_args`, `triton_grad_buffers`, `triton_grads`) fill in theirs.

Only plain `tl.load/store/dot/atomic_add` are used so the same code runs on triton 3.6 and 3.8 and
under TRITON_INTERPRET=1 (tests run the kernels on CPU tensors that way; no bf16 there).
"""
from typing import List, Tuple

import torch

from ..lut import build_lut
from ._common import HAS_TRITON, bs, call_reason, contig, pow2_at_least_16, tl, triton

__all__ = ["can_run", "run", "TILE_OPTIONS"]

NAME = "triton"
# linear tile spans (dense / causal / segments / mask); tests shrink them to get few programs
TILE_OPTIONS = {"block_m": 64, "block_n": 64}


def can_run(q, k, v, layout, mods, dropout_p):
    why = call_reason(q, k, v, "triton", "the block-sparse Triton kernel", layout, mods, dropout_p)
    return not why, why


if HAS_TRITON:

    @triton.jit
    def _qmap(qb, offs_m, Lq, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr,
              bq, nbx, wq, block, halo, win_h, win_w, mh, mw, CLAMP: tl.constexpr):
        """Query tile -> natural token, validity, local (ly, lx) and window start (sy, sx)."""
        if Q_MODE == 0:
            tok = qb * QS + offs_m
            valid = (offs_m < QS) & (tok < Lq)
            ly = offs_m * 0
            lx = offs_m * 0
            sy = qb * 0
            sx = qb * 0
        else:
            by = qb // nbx
            bx = qb % nbx
            ly = offs_m // QX
            lx = offs_m % QX
            valid = (ly < bq) & (lx < bq)
            tok = (by * bq + ly) * wq + bx * bq + lx
            sy = by * block - halo
            sx = bx * block - halo
            if CLAMP:
                sy = tl.minimum(tl.maximum(sy, 0), tl.maximum(mh - win_h, 0))
                sx = tl.minimum(tl.maximum(sx, 0), tl.maximum(mw - win_w, 0))
        tok = tl.where(valid, tok, 0)
        return tok, valid, ly, lx, sy, sx

    @triton.jit
    def _kmap(kb, offs_n, Lk, K_MODE: tl.constexpr, KS: tl.constexpr, KSY: tl.constexpr, KSX: tl.constexpr,
              KTX: tl.constexpr, ntx, ay, ax, mh, mw):
        """Key tile -> natural token, loadable (in range / in map), real slot, map coords."""
        if K_MODE == 0:
            tok = kb * KS + offs_n
            span = offs_n < KS
            inb = span & (tok < Lk)
            ky = offs_n * 0
            kx = offs_n * 0
        else:
            ty = kb // ntx
            tx = kb % ntx
            cy = offs_n // KTX
            cx = offs_n % KTX
            span = (cy < KSY) & (cx < KSX)
            ky = ty * KSY - ay + cy
            kx = tx * KSX - ax + cx
            inb = span & (ky >= 0) & (ky < mh) & (kx >= 0) & (kx < mw)
            tok = ky * mw + kx
        tok = tl.where(inb, tok, 0)
        return tok, inb, span, ky, kx

    @triton.jit
    def _gmm_m(tq, tk, kin, h_a, ALPHA, SIGMA, GP, ggw, NK: tl.constexpr, GADD: tl.constexpr):
        qp = tq - GP
        kp = tk - GP
        dy = (qp // ggw)[:, None] - (kp // ggw)[None, :]
        dx = (qp % ggw)[:, None] - (kp % ggw)[None, :]
        d2 = (dy * dy + dx * dx).to(tl.float32)
        mod = (qp >= 0)[:, None] & ((kp >= 0) & kin)[None, :]
        m = tl.zeros(d2.shape, dtype=tl.float32)
        for c in tl.static_range(NK):
            a = tl.load(ALPHA + h_a * NK + c).to(tl.float32)
            sg = tl.load(SIGMA + h_a * NK + c).to(tl.float32)
            m += a * tl.exp(-d2 / (2.0 * sg * sg))
        if GADD:
            m = tl.where(mod, m, 0.0)
        else:
            m = tl.where(mod, m, 1.0)
        return m, d2, mod

    @triton.jit
    def _logits(qk, b, h, tq, qv, ly, lx, sy, sx, tk, kin, kspan, ky, kx, scale, PARTIAL: tl.constexpr,
                K_MODE: tl.constexpr, K_PAD: tl.constexpr,
                WIN: tl.constexpr, CLAMP: tl.constexpr, win_h, win_w,
                KVV, kvv_sb, HAS_KVV: tl.constexpr,
                QID, KID, qid_sb, kid_sb, HAS_SEG: tl.constexpr,
                c_off, c_pre, CAUSAL: tl.constexpr,
                MSK, m_sb, m_sh, m_si, m_sj, HAS_MASK: tl.constexpr,
                BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
                TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj,
                RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw,
                ALPHA, SIGMA, h_a, GP, ggw, NK: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr):
        s = qk * scale
        if GMM:
            m, d2, mod = _gmm_m(tq, tk, kin, h_a, ALPHA, SIGMA, GP, ggw, NK, GADD)
            if GADD:
                s = s + m
            else:
                s = s * m
        pair = qv[:, None] & kin[None, :]
        if BIAS == 1:
            bv = tl.load(BP + b * bp_sb + h * bp_sh + tq[:, None] * bp_si + tk[None, :] * bp_sj,
                         mask=pair, other=0.0)
            s += bv.to(tl.float32)
        if BIAS == 2:
            iv = tl.load(IDX + b * ix_sb + tq[:, None] * ix_si + tk[None, :] * ix_sj, mask=pair, other=0)
            tv = tl.load(TAB + h * tab_sh + iv, mask=pair, other=0.0)
            s += tv.to(tl.float32)
        if BIAS == 3:
            if RP_WIN:
                iy = (ky - sy)[None, :] - ly[:, None] + Rh // 2
                ix = (kx - sx)[None, :] - lx[:, None] + Rw // 2
            else:
                iy = (tk // kgw)[None, :] - (tq // qgw)[:, None] + Rh // 2
                ix = (tk % kgw)[None, :] - (tq % qgw)[:, None] + Rw // 2
            okh = qv[:, None] & kspan[None, :] & (iy >= 0) & (iy < Rh)
            okw = qv[:, None] & kspan[None, :] & (ix >= 0) & (ix < Rw)
            if not RP_WIN:
                okh = okh & kin[None, :]
                okw = okw & kin[None, :]
            rv = tl.load(RH + b * rh_sb + h * rh_sh + tq[:, None] * rh_si + iy, mask=okh, other=0.0)
            rv2 = tl.load(RW + b * rw_sb + h * rw_sh + tq[:, None] * rw_si + ix, mask=okw, other=0.0)
            s += rv.to(tl.float32) + rv2.to(tl.float32)
        if PARTIAL:
            keep = qv[:, None] & kspan[None, :]
            if K_MODE == 0:
                keep = keep & kin[None, :]
            if WIN:
                inw = (ky >= sy) & (ky < sy + win_h) & (kx >= sx) & (kx < sx + win_w)
                if CLAMP:
                    inw = inw & kin
                keep = keep & inw[None, :]
            if HAS_KVV:
                kvv = tl.load(KVV + b * kvv_sb + tk, mask=kin, other=1)
                keep = keep & (kvv != 0)[None, :]
            if HAS_SEG:
                qi = tl.load(QID + b * qid_sb + tq, mask=qv, other=-1)
                ki = tl.load(KID + b * kid_sb + tk, mask=kin, other=-2)
                keep = keep & (qi[:, None] == ki[None, :]) & (qi >= 0)[:, None]
            if CAUSAL:
                ii = tq + c_off
                keep = keep & ((tk[None, :] <= ii[:, None]) | ((ii < c_pre)[:, None] & (tk < c_pre)[None, :]))
            if HAS_MASK:
                mv = tl.load(MSK + b * m_sb + h * m_sh + tq[:, None] * m_si + tk[None, :] * m_sj, mask=pair, other=0)
                keep = keep & (mv != 0)
            s = tl.where(keep, s, float("-inf"))
        else:
            if K_PAD:
                if K_MODE == 0:
                    s = tl.where(kin[None, :], s, float("-inf"))
                else:
                    s = tl.where(kspan[None, :], s, float("-inf"))
        return s



    @triton.jit
    def _fwd_step(acc, m_i, l_i, q, b, h, kb, tq, qv, ly, lx, sy, sx, offs_n, offs_d, offs_dv,
                  K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, PARTIAL: tl.constexpr, Lq, Lk, H, scale, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr, bq, nbx, wq,
            block, halo, win_h, win_w, mh, mw, K_MODE: tl.constexpr, KS: tl.constexpr,
            KSY: tl.constexpr, KSX: tl.constexpr, KTX: tl.constexpr, ntx, ay, ax, K_PAD: tl.constexpr,
            WIN: tl.constexpr, CLAMP: tl.constexpr, KVV, kvv_sb, HAS_KVV: tl.constexpr, QID, KID,
            qid_sb, kid_sb, HAS_SEG: tl.constexpr, c_off, c_pre, CAUSAL: tl.constexpr, MSK, m_sb, m_sh,
            m_si, m_sj, HAS_MASK: tl.constexpr, BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
            TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si,
            Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw, ALPHA, SIGMA, a_sh, GP, ggw, NK: tl.constexpr,
            KP: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, D, DV, DP: tl.constexpr, DVP: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PREC: tl.constexpr):
        tk, kin, kspan, ky, kx = _kmap(kb, offs_n, Lk, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax, mh, mw)
        kt = tl.load(K + b * sk_b + h * sk_h + tk[:, None] * sk_n + offs_d[None, :],
                     mask=kin[:, None] & (offs_d < D)[None, :], other=0.0)
        vt = tl.load(V + b * sv_b + h * sv_h + tk[:, None] * sv_n + offs_dv[None, :],
                     mask=kin[:, None] & (offs_dv < DV)[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(kt), input_precision=PREC)
        s = _logits(qk, b, h, tq, qv, ly, lx, sy, sx, tk, kin, kspan, ky, kx, scale, PARTIAL, K_MODE, K_PAD, WIN, CLAMP, win_h, win_w, KVV, kvv_sb, HAS_KVV, QID,
                    KID, qid_sb, kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si, m_sj,
                    HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB, tab_sh, IDX, ix_sb, ix_si,
                    ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw,
                    ALPHA, SIGMA, h * a_sh, GP, ggw, NK, GMM, GADD)
        s2 = s * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt, input_precision=PREC)
        return acc, m_new, l_i


    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m,
                  KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, l_sb, l_sh, li_sb, li_sh, li_sq, lf_sb, lf_sh, lf_sq,
                  Lq, Lk, H, scale, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr, bq, nbx, wq,
            block, halo, win_h, win_w, mh, mw, K_MODE: tl.constexpr, KS: tl.constexpr,
            KSY: tl.constexpr, KSX: tl.constexpr, KTX: tl.constexpr, ntx, ay, ax, K_PAD: tl.constexpr,
            WIN: tl.constexpr, CLAMP: tl.constexpr, KVV, kvv_sb, HAS_KVV: tl.constexpr, QID, KID,
            qid_sb, kid_sb, HAS_SEG: tl.constexpr, c_off, c_pre, CAUSAL: tl.constexpr, MSK, m_sb, m_sh,
            m_si, m_sj, HAS_MASK: tl.constexpr, BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
            TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si,
            Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw, ALPHA, SIGMA, a_sh, GP, ggw, NK: tl.constexpr,
            KP: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, D, DV, DP: tl.constexpr, DVP: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PREC: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, DP)
        offs_dv = tl.arange(0, DVP)
        tq, qv, ly, lx, sy, sx = _qmap(qb, offs_m, Lq, Q_MODE, QS, QX, bq, nbx, wq, block, halo, win_h, win_w,
                                       mh, mw, CLAMP)
        q = tl.load(Q + b * sq_b + h * sq_h + tq[:, None] * sq_m + offs_d[None, :],
                    mask=qv[:, None] & (offs_d < D)[None, :], other=0.0)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, DVP], dtype=tl.float32)
        n_p = tl.load(KV_NUM + b * l_sb + h * l_sh + qb)
        for t in range(0, n_p):
            kb = tl.load(KV_IDX + b * li_sb + h * li_sh + qb * li_sq + t)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, b, h, kb, tq, qv, ly, lx, sy, sx, offs_n, offs_d, offs_dv,
                                      K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, True, Lq, Lk, H, scale, Q_MODE, QS, QX, bq, nbx, wq, block, halo,
                                      win_h, win_w, mh, mw, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax,
                                      K_PAD, WIN, CLAMP, KVV, kvv_sb, HAS_KVV, QID, KID, qid_sb,
                                      kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si,
                                      m_sj, HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB,
                                      tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si,
                                      rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw, ALPHA, SIGMA,
                                      a_sh, GP, ggw, NK, KP, GMM, GADD, BM, BN, D, DV, DP, DVP,
                                      DOT_DTYPE, PREC)
        n_f = tl.load(FULL_NUM + b * l_sb + h * l_sh + qb)
        for t in range(0, n_f):
            kb = tl.load(FULL_IDX + b * lf_sb + h * lf_sh + qb * lf_sq + t)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, b, h, kb, tq, qv, ly, lx, sy, sx, offs_n, offs_d, offs_dv,
                                      K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, False, Lq, Lk, H, scale, Q_MODE, QS, QX, bq, nbx, wq, block, halo,
                                      win_h, win_w, mh, mw, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax,
                                      K_PAD, WIN, CLAMP, KVV, kvv_sb, HAS_KVV, QID, KID, qid_sb,
                                      kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si,
                                      m_sj, HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB,
                                      tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si,
                                      rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw, ALPHA, SIGMA,
                                      a_sh, GP, ggw, NK, KP, GMM, GADD, BM, BN, D, DV, DP, DVP,
                                      DOT_DTYPE, PREC)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(O + b * so_b + h * so_h + tq[:, None] * so_m + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=qv[:, None] & (offs_dv < DV)[None, :])
        tl.store(LSE + bh * Lq + tq, lse, mask=qv)


    @triton.jit
    def _dkdv_step(dk, dv, kt, vt, b, h, kb, qb, tk, kin, kspan, ky, kx, offs_m, offs_d, offs_dv,
                   Q, DO, LSE, DELTA, sq_b, sq_h, sq_m, sd_b, sd_h, sd_m, PARTIAL: tl.constexpr, Lq, Lk, H, scale, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr, bq, nbx, wq,
            block, halo, win_h, win_w, mh, mw, K_MODE: tl.constexpr, KS: tl.constexpr,
            KSY: tl.constexpr, KSX: tl.constexpr, KTX: tl.constexpr, ntx, ay, ax, K_PAD: tl.constexpr,
            WIN: tl.constexpr, CLAMP: tl.constexpr, KVV, kvv_sb, HAS_KVV: tl.constexpr, QID, KID,
            qid_sb, kid_sb, HAS_SEG: tl.constexpr, c_off, c_pre, CAUSAL: tl.constexpr, MSK, m_sb, m_sh,
            m_si, m_sj, HAS_MASK: tl.constexpr, BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
            TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si,
            Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw, ALPHA, SIGMA, a_sh, GP, ggw, NK: tl.constexpr,
            KP: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, D, DV, DP: tl.constexpr, DVP: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PREC: tl.constexpr):
        tq, qv, ly, lx, sy, sx = _qmap(qb, offs_m, Lq, Q_MODE, QS, QX, bq, nbx, wq, block, halo, win_h, win_w,
                                       mh, mw, CLAMP)
        q = tl.load(Q + b * sq_b + h * sq_h + tq[:, None] * sq_m + offs_d[None, :],
                    mask=qv[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(DO + b * sd_b + h * sd_h + tq[:, None] * sd_m + offs_dv[None, :],
                     mask=qv[:, None] & (offs_dv < DV)[None, :], other=0.0)
        bh = b * H + h
        lse = tl.load(LSE + bh * Lq + tq, mask=qv, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + bh * Lq + tq, mask=qv, other=0.0)
        qk = tl.dot(q, tl.trans(kt), input_precision=PREC)
        s = _logits(qk, b, h, tq, qv, ly, lx, sy, sx, tk, kin, kspan, ky, kx, scale, PARTIAL, K_MODE, K_PAD, WIN, CLAMP, win_h, win_w, KVV, kvv_sb, HAS_KVV, QID,
                    KID, qid_sb, kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si, m_sj,
                    HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB, tab_sh, IDX, ix_sb, ix_si,
                    ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw,
                    ALPHA, SIGMA, h * a_sh, GP, ggw, NK, GMM, GADD)
        p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
        p = tl.where(qv[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(DOT_DTYPE)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if GMM:
            if not GADD:
                m, d2, mod = _gmm_m(tq, tk, kin, h * a_sh, ALPHA, SIGMA, GP, ggw, NK, GADD)
                ds = ds * m
        dk += tl.dot(tl.trans((ds * scale).to(DOT_DTYPE)), q, input_precision=PREC)
        return dk, dv


    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                       sd_b, sd_h, sd_m, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                       Q_NUM, Q_IDX, FQ_NUM, FQ_IDX, l_sb, l_sh, li_sb, li_sh, li_sk, lf_sb, lf_sh, lf_sk,
                       Lq, Lk, H, scale, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr, bq, nbx, wq,
            block, halo, win_h, win_w, mh, mw, K_MODE: tl.constexpr, KS: tl.constexpr,
            KSY: tl.constexpr, KSX: tl.constexpr, KTX: tl.constexpr, ntx, ay, ax, K_PAD: tl.constexpr,
            WIN: tl.constexpr, CLAMP: tl.constexpr, KVV, kvv_sb, HAS_KVV: tl.constexpr, QID, KID,
            qid_sb, kid_sb, HAS_SEG: tl.constexpr, c_off, c_pre, CAUSAL: tl.constexpr, MSK, m_sb, m_sh,
            m_si, m_sj, HAS_MASK: tl.constexpr, BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
            TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si,
            Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw, ALPHA, SIGMA, a_sh, GP, ggw, NK: tl.constexpr,
            KP: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, D, DV, DP: tl.constexpr, DVP: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PREC: tl.constexpr):
        kb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, DP)
        offs_dv = tl.arange(0, DVP)
        tk, kin, kspan, ky, kx = _kmap(kb, offs_n, Lk, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax, mh, mw)
        kt = tl.load(K + b * sk_b + h * sk_h + tk[:, None] * sk_n + offs_d[None, :],
                     mask=kin[:, None] & (offs_d < D)[None, :], other=0.0)
        vt = tl.load(V + b * sv_b + h * sv_h + tk[:, None] * sv_n + offs_dv[None, :],
                     mask=kin[:, None] & (offs_dv < DV)[None, :], other=0.0)
        dk = tl.zeros([BN, DP], dtype=tl.float32)
        dv = tl.zeros([BN, DVP], dtype=tl.float32)
        n_p = tl.load(Q_NUM + b * l_sb + h * l_sh + kb)
        for t in range(0, n_p):
            qb = tl.load(Q_IDX + b * li_sb + h * li_sh + kb * li_sk + t)
            dk, dv = _dkdv_step(dk, dv, kt, vt, b, h, kb, qb, tk, kin, kspan, ky, kx, offs_m, offs_d, offs_dv,
                                Q, DO, LSE, DELTA, sq_b, sq_h, sq_m, sd_b, sd_h, sd_m, True, Lq, Lk, H, scale, Q_MODE, QS, QX, bq, nbx, wq, block, halo,
                                      win_h, win_w, mh, mw, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax,
                                      K_PAD, WIN, CLAMP, KVV, kvv_sb, HAS_KVV, QID, KID, qid_sb,
                                      kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si,
                                      m_sj, HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB,
                                      tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si,
                                      rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw, ALPHA, SIGMA,
                                      a_sh, GP, ggw, NK, KP, GMM, GADD, BM, BN, D, DV, DP, DVP,
                                      DOT_DTYPE, PREC)
        n_f = tl.load(FQ_NUM + b * l_sb + h * l_sh + kb)
        for t in range(0, n_f):
            qb = tl.load(FQ_IDX + b * lf_sb + h * lf_sh + kb * lf_sk + t)
            dk, dv = _dkdv_step(dk, dv, kt, vt, b, h, kb, qb, tk, kin, kspan, ky, kx, offs_m, offs_d, offs_dv,
                                Q, DO, LSE, DELTA, sq_b, sq_h, sq_m, sd_b, sd_h, sd_m, False, Lq, Lk, H, scale, Q_MODE, QS, QX, bq, nbx, wq, block, halo,
                                      win_h, win_w, mh, mw, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax,
                                      K_PAD, WIN, CLAMP, KVV, kvv_sb, HAS_KVV, QID, KID, qid_sb,
                                      kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si,
                                      m_sj, HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB,
                                      tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si,
                                      rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw, ALPHA, SIGMA,
                                      a_sh, GP, ggw, NK, KP, GMM, GADD, BM, BN, D, DV, DP, DVP,
                                      DOT_DTYPE, PREC)
        tl.store(DK + b * sdk_b + h * sdk_h + tk[:, None] * sdk_n + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=kin[:, None] & (offs_d < D)[None, :])
        tl.store(DV_ + b * sdv_b + h * sdv_h + tk[:, None] * sdv_n + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=kin[:, None] & (offs_dv < DV)[None, :])


    @triton.jit
    def _dq_step(dq, ga, gs, q, do, lse, delta, b, h, kb, tq, qv, ly, lx, sy, sx, offs_n, offs_d, offs_dv,
                 K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                 DBIAS, db_sb, db_sh, db_si, db_sj, DB_ATOMIC: tl.constexpr, DTAB, DRH, DRW,
                 KTY: tl.constexpr, PARTIAL: tl.constexpr, Lq, Lk, H, scale, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr, bq, nbx, wq,
            block, halo, win_h, win_w, mh, mw, K_MODE: tl.constexpr, KS: tl.constexpr,
            KSY: tl.constexpr, KSX: tl.constexpr, KTX: tl.constexpr, ntx, ay, ax, K_PAD: tl.constexpr,
            WIN: tl.constexpr, CLAMP: tl.constexpr, KVV, kvv_sb, HAS_KVV: tl.constexpr, QID, KID,
            qid_sb, kid_sb, HAS_SEG: tl.constexpr, c_off, c_pre, CAUSAL: tl.constexpr, MSK, m_sb, m_sh,
            m_si, m_sj, HAS_MASK: tl.constexpr, BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
            TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si,
            Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw, ALPHA, SIGMA, a_sh, GP, ggw, NK: tl.constexpr,
            KP: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, D, DV, DP: tl.constexpr, DVP: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PREC: tl.constexpr):
        tk, kin, kspan, ky, kx = _kmap(kb, offs_n, Lk, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax, mh, mw)
        kt = tl.load(K + b * sk_b + h * sk_h + tk[:, None] * sk_n + offs_d[None, :],
                     mask=kin[:, None] & (offs_d < D)[None, :], other=0.0)
        vt = tl.load(V + b * sv_b + h * sv_h + tk[:, None] * sv_n + offs_dv[None, :],
                     mask=kin[:, None] & (offs_dv < DV)[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(kt), input_precision=PREC)
        s = _logits(qk, b, h, tq, qv, ly, lx, sy, sx, tk, kin, kspan, ky, kx, scale, PARTIAL, K_MODE, K_PAD, WIN, CLAMP, win_h, win_w, KVV, kvv_sb, HAS_KVV, QID,
                    KID, qid_sb, kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si, m_sj,
                    HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB, tab_sh, IDX, ix_sb, ix_si,
                    ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw,
                    ALPHA, SIGMA, h * a_sh, GP, ggw, NK, GMM, GADD)
        p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
        p = tl.where(qv[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dsq = ds
        if GMM:
            m, d2, mod = _gmm_m(tq, tk, kin, h * a_sh, ALPHA, SIGMA, GP, ggw, NK, GADD)
            offs_k = tl.arange(0, KP)
            if GADD:
                base = ds
            else:
                base = ds * (qk * scale)
                dsq = ds * m
            base = tl.where(mod, base, 0.0)
            for c in tl.static_range(NK):
                a = tl.load(ALPHA + h * a_sh * NK + c).to(tl.float32)
                sg = tl.load(SIGMA + h * a_sh * NK + c).to(tl.float32)
                g = tl.exp(-d2 / (2.0 * sg * sg))
                ca = tl.sum(tl.sum(base * g, 1), 0)
                cs = tl.sum(tl.sum(base * g * d2, 1), 0) * a / (sg * sg * sg)
                ga += tl.where(offs_k == c, ca, 0.0)
                gs += tl.where(offs_k == c, cs, 0.0)
        dq += tl.dot((dsq * scale).to(DOT_DTYPE), kt, input_precision=PREC)
        pair = qv[:, None] & kin[None, :]
        if BIAS == 1:
            ptrs = DBIAS + b * db_sb + h * db_sh + tq[:, None] * db_si + tk[None, :] * db_sj
            if DB_ATOMIC:
                tl.atomic_add(ptrs, ds, mask=pair)
            else:
                tl.store(ptrs, ds, mask=pair)
        if BIAS == 2:
            iv = tl.load(IDX + b * ix_sb + tq[:, None] * ix_si + tk[None, :] * ix_sj, mask=pair, other=0)
            tl.atomic_add(DTAB + h * tab_sh + iv, ds, mask=pair)
        if BIAS == 3:
            if RP_WIN:
                ds3 = tl.reshape(ds, (BM, KTY, KTX))
                dh = tl.sum(ds3, 2)
                dw = tl.sum(ds3, 1)
                ty = kb // ntx
                tx = kb % ntx
                ry = ty * KSY - ay + tl.arange(0, KTY)
                rx = tx * KSX - ax + tl.arange(0, KTX)
                iy = (ry - sy)[None, :] - ly[:, None] + Rh // 2
                ix = (rx - sx)[None, :] - lx[:, None] + Rw // 2
                okh = qv[:, None] & (tl.arange(0, KTY) < KSY)[None, :] & (iy >= 0) & (iy < Rh)
                okw = qv[:, None] & (tl.arange(0, KTX) < KSX)[None, :] & (ix >= 0) & (ix < Rw)
                tl.atomic_add(DRH + b * rh_sb + h * rh_sh + tq[:, None] * rh_si + iy, dh, mask=okh)
                tl.atomic_add(DRW + b * rw_sb + h * rw_sh + tq[:, None] * rw_si + ix, dw, mask=okw)
            else:
                iy = (tk // kgw)[None, :] - (tq // qgw)[:, None] + Rh // 2
                ix = (tk % kgw)[None, :] - (tq % qgw)[:, None] + Rw // 2
                okh = pair & (iy >= 0) & (iy < Rh)
                okw = pair & (ix >= 0) & (ix < Rw)
                tl.atomic_add(DRH + b * rh_sb + h * rh_sh + tq[:, None] * rh_si + iy, ds, mask=okh)
                tl.atomic_add(DRW + b * rw_sb + h * rw_sh + tq[:, None] * rw_si + ix, ds, mask=okw)
        return dq, ga, gs


    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                     sd_b, sd_h, sd_m, sdq_b, sdq_h, sdq_m,
                     KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, l_sb, l_sh, li_sb, li_sh, li_sq, lf_sb, lf_sh, lf_sq,
                     DBIAS, db_sb, db_sh, db_si, db_sj, DB_ATOMIC: tl.constexpr, DTAB, DRH, DRW, DALPHA, DSIGMA,
                     KTY: tl.constexpr, Lq, Lk, H, scale, Q_MODE: tl.constexpr, QS: tl.constexpr, QX: tl.constexpr, bq, nbx, wq,
            block, halo, win_h, win_w, mh, mw, K_MODE: tl.constexpr, KS: tl.constexpr,
            KSY: tl.constexpr, KSX: tl.constexpr, KTX: tl.constexpr, ntx, ay, ax, K_PAD: tl.constexpr,
            WIN: tl.constexpr, CLAMP: tl.constexpr, KVV, kvv_sb, HAS_KVV: tl.constexpr, QID, KID,
            qid_sb, kid_sb, HAS_SEG: tl.constexpr, c_off, c_pre, CAUSAL: tl.constexpr, MSK, m_sb, m_sh,
            m_si, m_sj, HAS_MASK: tl.constexpr, BIAS: tl.constexpr, BP, bp_sb, bp_sh, bp_si, bp_sj,
            TAB, tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si, rw_sb, rw_sh, rw_si,
            Rh, Rw, RP_WIN: tl.constexpr, qgw, kgw, ALPHA, SIGMA, a_sh, GP, ggw, NK: tl.constexpr,
            KP: tl.constexpr, GMM: tl.constexpr, GADD: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, D, DV, DP: tl.constexpr, DVP: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PREC: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, DP)
        offs_dv = tl.arange(0, DVP)
        tq, qv, ly, lx, sy, sx = _qmap(qb, offs_m, Lq, Q_MODE, QS, QX, bq, nbx, wq, block, halo, win_h, win_w,
                                       mh, mw, CLAMP)
        q = tl.load(Q + b * sq_b + h * sq_h + tq[:, None] * sq_m + offs_d[None, :],
                    mask=qv[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(DO + b * sd_b + h * sd_h + tq[:, None] * sd_m + offs_dv[None, :],
                     mask=qv[:, None] & (offs_dv < DV)[None, :], other=0.0)
        lse = tl.load(LSE + bh * Lq + tq, mask=qv, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + bh * Lq + tq, mask=qv, other=0.0)
        dq = tl.zeros([BM, DP], dtype=tl.float32)
        ga = tl.zeros([KP], dtype=tl.float32)
        gs = tl.zeros([KP], dtype=tl.float32)
        n_p = tl.load(KV_NUM + b * l_sb + h * l_sh + qb)
        for t in range(0, n_p):
            kb = tl.load(KV_IDX + b * li_sb + h * li_sh + qb * li_sq + t)
            dq, ga, gs = _dq_step(dq, ga, gs, q, do, lse, delta, b, h, kb, tq, qv, ly, lx, sy, sx, offs_n, offs_d,
                                  offs_dv, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, DBIAS, db_sb, db_sh, db_si, db_sj,
                                  DB_ATOMIC, DTAB, DRH, DRW, KTY, True, Lq, Lk, H, scale, Q_MODE, QS, QX, bq, nbx, wq, block, halo,
                                      win_h, win_w, mh, mw, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax,
                                      K_PAD, WIN, CLAMP, KVV, kvv_sb, HAS_KVV, QID, KID, qid_sb,
                                      kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si,
                                      m_sj, HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB,
                                      tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si,
                                      rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw, ALPHA, SIGMA,
                                      a_sh, GP, ggw, NK, KP, GMM, GADD, BM, BN, D, DV, DP, DVP,
                                      DOT_DTYPE, PREC)
        n_f = tl.load(FULL_NUM + b * l_sb + h * l_sh + qb)
        for t in range(0, n_f):
            kb = tl.load(FULL_IDX + b * lf_sb + h * lf_sh + qb * lf_sq + t)
            dq, ga, gs = _dq_step(dq, ga, gs, q, do, lse, delta, b, h, kb, tq, qv, ly, lx, sy, sx, offs_n, offs_d,
                                  offs_dv, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, DBIAS, db_sb, db_sh, db_si, db_sj,
                                  DB_ATOMIC, DTAB, DRH, DRW, KTY, False, Lq, Lk, H, scale, Q_MODE, QS, QX, bq, nbx, wq, block, halo,
                                      win_h, win_w, mh, mw, K_MODE, KS, KSY, KSX, KTX, ntx, ay, ax,
                                      K_PAD, WIN, CLAMP, KVV, kvv_sb, HAS_KVV, QID, KID, qid_sb,
                                      kid_sb, HAS_SEG, c_off, c_pre, CAUSAL, MSK, m_sb, m_sh, m_si,
                                      m_sj, HAS_MASK, BIAS, BP, bp_sb, bp_sh, bp_si, bp_sj, TAB,
                                      tab_sh, IDX, ix_sb, ix_si, ix_sj, RH, RW, rh_sb, rh_sh, rh_si,
                                      rw_sb, rw_sh, rw_si, Rh, Rw, RP_WIN, qgw, kgw, ALPHA, SIGMA,
                                      a_sh, GP, ggw, NK, KP, GMM, GADD, BM, BN, D, DV, DP, DVP,
                                      DOT_DTYPE, PREC)
        tl.store(DQ + b * sdq_b + h * sdq_h + tq[:, None] * sdq_m + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=qv[:, None] & (offs_d < D)[None, :])
        if GMM:
            offs_k = tl.arange(0, KP)
            tl.atomic_add(DALPHA + h * a_sh * NK + offs_k, ga, mask=offs_k < NK)
            tl.atomic_add(DSIGMA + h * a_sh * NK + offs_k, gs, mask=offs_k < NK)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------
def _neutral_args(dev):
    """Kernel arguments with every layout predicate and modifier switched off."""
    dummy = torch.zeros(1, device=dev, dtype=torch.int32)
    fdummy = torch.zeros(1, device=dev, dtype=torch.float32)
    return dict(bq=1, nbx=1, wq=1, block=1, halo=0, win_h=1, win_w=1, mh=1, mw=1, WIN=False, CLAMP=False,
                KVV=dummy, kvv_sb=0, HAS_KVV=False, QID=dummy, KID=dummy, qid_sb=0, kid_sb=0, HAS_SEG=False,
                c_off=0, c_pre=0, CAUSAL=False, MSK=dummy, m_sb=0, m_sh=0, m_si=0, m_sj=0, HAS_MASK=False,
                BIAS=0, BP=fdummy, bp_sb=0, bp_sh=0, bp_si=0, bp_sj=0, TAB=fdummy, tab_sh=0, IDX=dummy,
                ix_sb=0, ix_si=0, ix_sj=0, RH=fdummy, RW=fdummy, rh_sb=0, rh_sh=0, rh_si=0, rw_sb=0, rw_sh=0,
                rw_si=0, Rh=1, Rw=1, RP_WIN=False, qgw=1, kgw=1, ALPHA=fdummy, SIGMA=fdummy, a_sh=0, GP=0,
                ggw=1, NK=1, KP=2, GMM=False, GADD=False), fdummy


def _neutral_grads(fdummy):
    return dict(DBIAS=fdummy, db_sb=0, db_sh=0, db_si=0, db_sj=0, DB_ATOMIC=False, DTAB=fdummy, DRH=fdummy,
                DRW=fdummy, DALPHA=fdummy, DSIGMA=fdummy)


class _Plan:
    """Everything a launch needs: LUT, kernel scalar/constexpr arguments and auxiliary tensors."""

    def __init__(self, q, k, v, layout, scale, mods):
        B, H, Lq, D = q.shape
        Lk, Dv = k.shape[2], v.shape[3]
        dev = q.device
        self.B, self.H, self.Lq, self.Lk, self.D, self.Dv = B, H, Lq, Lk, D, Dv
        self.layout, self.mods = layout, list(mods)
        # Tiles that also evaluate a bias, the GMM mod or mask bits, or wide heads, need more
        # registers: at 64x64 with 4 warps ptxas spilled 100-1600 bytes per thread on sm_90. Those
        # variants get 8 warps and, with linear tiles, 32-key tiles (spill-free for D <= 64).
        heavy = bool(mods) or (layout is not None and layout.heavy_predicate) or max(D, Dv) > 64
        linear = layout is None or layout.linear_tiles
        block_n = min(TILE_OPTIONS["block_n"], 32) if heavy and linear else TILE_OPTIONS["block_n"]
        lut = build_lut(layout, Lq, Lk, dev, TILE_OPTIONS["block_m"], block_n)
        self.lut = lut
        a, self.fdummy = _neutral_args(dev)
        a.update(Lq=Lq, Lk=Lk, H=H, scale=float(scale), Q_MODE=lut.q_mode, QS=lut.QS, QX=lut.QX,
                 K_MODE=lut.k_mode, KS=lut.KS, KSY=lut.KSY, KSX=lut.KSX, KTX=lut.KTX, ntx=lut.ntx, ay=lut.ay,
                 ax=lut.ax, K_PAD=bool(lut.k_pad), BM=lut.BM, BN=lut.BN, D=D, DV=Dv,
                 DP=pow2_at_least_16(D), DVP=pow2_at_least_16(Dv),
                 DOT_DTYPE={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32),
                 PREC="ieee" if q.dtype == torch.float32 else "tf32")
        self.KTY = lut.KTY
        if layout is not None:
            a.update(layout.triton_args(dev))
        for m in self.mods:
            a.update(m.triton_args(layout, dev))
        self.args = a
        big = max(a["DP"], a["DVP"])
        self.num_warps = 8 if heavy and lut.BM * lut.BN >= 64 * 32 else 4
        # wide heads and heavy tiles: fewer pipeline stages (shared memory, registers)
        self.launch = dict(num_warps=self.num_warps, num_stages=2 if big >= 128 or heavy else 3)

    def lut_args(self, transposed=False):
        L = self.lut
        if not transposed:
            n, i, fn, fi = L.kv_num, L.kv_idx, L.full_num, L.full_idx
        else:
            n, i, fn, fi = L.q_num, L.q_idx, L.fq_num, L.fq_idx
        return (n, i, fn, fi, bs(n, 0), bs(n, 1), bs(i, 0), bs(i, 1), i.stride(2),
                bs(fi, 0), bs(fi, 1), fi.stride(2))


def _strides(*ts):
    """(batch, head, row) strides of each (B, H, L, D) tensor, flattened (the kernels' order)."""
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


def _fwd(plan: _Plan, q, k, v):
    B, H, Lq = plan.B, plan.H, plan.Lq
    out = torch.empty(B, H, Lq, plan.Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    _attn_fwd[(plan.lut.nQB, B * H)](q, k, v, out, lse, *_strides(q, k, v, out), *plan.lut_args(),
                                     **plan.args, **plan.launch)
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
    a = plan.args
    _attn_bwd_dkdv[(plan.lut.nKB, B * H)](q, k, v, dout, lse, delta, dk, dv, *_strides(q, k, v, dout, dk, dv),
                                          *plan.lut_args(transposed=True), **a, **plan.launch)
    shape = (B, H, plan.Lq, plan.Lk)
    grads = _neutral_grads(plan.fdummy)
    per_mod = []
    for m in plan.mods:
        bufs = m.triton_grad_buffers(a, shape, q.device)
        grads.update(bufs)
        per_mod.append(bufs)
    _attn_bwd_dq[(plan.lut.nQB, B * H)](q, k, v, dout, lse, delta, dq, *_strides(q, k, v, dout, dq),
                                        *plan.lut_args(), KTY=plan.KTY, **grads, **a, **plan.launch)
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
