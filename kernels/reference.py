"""PyTorch reference backend: CPU training path and test oracle.

Every layout becomes a list of *query groups* (a halo block, a routed region, a segment, a chunk of
rows), each with its own gathered keys. Groups are processed in chunks whose score tensor stays
under a budget, so no (B, H, Lq, Lk) tensor and no fully gathered K/V is ever held at once. Small
problems run in one chunk under plain autograd (fastest); large ones recompute each chunk in
backward (`_Recompute`), so memory stays at one chunk.

`dense_oracle` is a deliberately naive second implementation (full logits + `to_dense_mask`) for
tests only.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from .bias import GaussianMixture, IndexedBias, RelPosBias
from .layout import CausalLayout, KeyListLayout, Layout, MaskLayout, RoutedLayout, SegmentLayout, WindowLayout

__all__ = ["reference_attention", "dense_oracle", "CHUNK_ELEMENTS", "RECOMPUTE_ABOVE"]

# score-matrix elements per chunk; and total elements above which backward recomputes chunks
CHUNK_ELEMENTS = 1 << 24
# routed layouts keeping at least this fraction of the regions run as SDPA over a dense bool mask
# (if that mask has at most DENSE_ROUTED_MAX_MASK elements)
DENSE_ROUTED_FRACTION = 0.25
DENSE_ROUTED_MAX_MASK = 1 << 24
RECOMPUTE_ABOVE = 1 << 26

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# core: attention over gathered groups
# ----------------------------------------------------------------------------------------------
def _attend(qg, kg, vg, scale, add=None, mask=None, mul=None, safe=True, need_lse=True):
    """qg (..., M, D), kg (..., N, D), vg (..., N, Dv) -> out (..., M, Dv), lse (..., M) or None."""
    if add is None and mul is None and mask is None and not need_lse and qg.shape[:-2] == kg.shape[:-2] \
            and kg.shape[:-1] == vg.shape[:-1] and qg.dim() >= 3:
        # plain attention per group: the fused SDPA kernel (fwd + bwd) is fastest
        lead = qg.shape[:-2]
        o = F.scaled_dot_product_attention(qg.reshape(-1, 1, *qg.shape[-2:]), kg.reshape(-1, 1, *kg.shape[-2:]),
                                           vg.reshape(-1, 1, *vg.shape[-2:]), scale=scale)
        return o.reshape(*lead, *o.shape[-2:]), None
    if mul is None and not safe and not need_lse and qg.dim() >= 3:
        # additive bias / mask without empty rows: SDPA with a float mask (one fused pass, ~2x
        # faster on CPU than the separate matmul-softmax-matmul steps below)
        if isinstance(add, tuple):
            gh, gw = add
            am = (gh.unsqueeze(-1) + gw.unsqueeze(-2)).flatten(-2)
        else:
            am = add
        if mask is not None:
            zero = torch.zeros((), dtype=qg.dtype, device=qg.device)
            mm = torch.where(mask, zero, torch.full_like(zero, _NEG_INF))
            am = mm if am is None else am + mm
        lead = torch.broadcast_shapes(qg.shape[:-2], kg.shape[:-2], vg.shape[:-2], am.shape[:-2])
        M, N = qg.shape[-2], kg.shape[-2]
        flat = lambda t, last: t.expand(*lead, t.shape[-2], last).reshape(-1, 1, t.shape[-2], last)
        o = F.scaled_dot_product_attention(flat(qg, qg.shape[-1]), flat(kg, kg.shape[-1]), flat(vg, vg.shape[-1]),
                                           attn_mask=am.expand(*lead, M, N).reshape(-1, 1, M, N), scale=scale)
        return o.reshape(*lead, M, vg.shape[-1]), None
    if mul is not None:
        s = torch.matmul(qg, kg.transpose(-1, -2)) * (mul * scale)
    else:
        s = torch.matmul(qg * scale, kg.transpose(-1, -2))     # scale the (M, D) side, not (M, N)
    if isinstance(add, tuple):        # separable window rel-pos: add rows and columns in place
        gh, gw = add
        s4 = s.view(*s.shape[:-1], gh.shape[-1], gw.shape[-1])
        s4 += gh.unsqueeze(-1)
        s4 += gw.unsqueeze(-2)
    elif add is not None:
        s = s + add
    if mask is not None:
        s = s.masked_fill(~mask, _NEG_INF)
    if not safe:
        p = torch.softmax(s, dim=-1)
        out = torch.matmul(p, vg)
        lse = torch.logsumexp(s, dim=-1) if need_lse else None
        return out, lse
    # NaN-free softmax: rows without any admissible key give out 0 and lse -inf.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vg) / torch.where(l > 0, l, torch.ones_like(l))
    lse = (m + torch.log(l)).squeeze(-1) if need_lse else None
    return out, lse


def _rel_to_abs(x, n_out):
    """x (..., W, R) -> (..., W, n_out) with out[i, j] = x[i, j - i + R // 2] (relative -> absolute
    offsets by the pad-and-reshape trick; no gather, cheap backward)."""
    *lead, W, R = x.shape
    flat = F.pad(x, (0, 1)).reshape(*lead, W * (R + 1))
    if W < R // 2:
        flat = F.pad(flat, (0, R // 2 - W))
    return flat[..., R // 2: R // 2 + W * R].reshape(*lead, W, R)[..., :n_out]


def _pair_gather(t, bi, hi, qi, ki):
    """t (Bt, Ht, Lq, Lk) -> t[bi, hi, qi, ki] with broadcast index tensors; negative indices read 0
    (callers zero them)."""
    return t[bi, hi, qi.clamp_min(0), ki.clamp_min(0)]


def _eval_bias(bias, score_mod, ctx, B, H):
    """Evaluate bias / score_mod on a chunk. ctx: qi (Gc, M), ki (Bk, Hk, Gc, N) natural indices
    (-1 = virtual/pad), gb (Gc,) batch of each group or None, win (WindowLayout or None).
    Returns (add, mul), each broadcastable to (B', H', Gc, M, N) or None."""
    qi, ki, gb, win = ctx["qi"], ctx["ki"], ctx.get("gb"), ctx.get("win")
    Gc, M = qi.shape
    q5 = qi.view(1, 1, Gc, M, 1)
    k5 = ki.unsqueeze(-2)                                   # (Bk, Hk, Gc, 1, N)
    kvalid = k5 >= 0

    def bidx(Bt):
        if gb is not None:
            return (gb if Bt > 1 else torch.zeros_like(gb)).view(1, 1, Gc, 1, 1)
        return torch.arange(Bt, device=qi.device).view(Bt, 1, 1, 1, 1)

    def hidx(Ht):
        return torch.arange(Ht, device=qi.device).view(1, Ht, 1, 1, 1)

    add = mul = None
    if score_mod is not None:
        gm: GaussianMixture = score_mod
        P = gm.num_prefix_tokens
        gw = gm.grid[1]
        qp, kp = q5 - P, k5 - P
        dy = torch.div(qp, gw, rounding_mode="floor") - torch.div(kp, gw, rounding_mode="floor")
        dx = qp.remainder(gw) - kp.remainder(gw)
        d2 = (dy * dy + dx * dx).to(gm.alpha.dtype)          # (Bk, Hk, Gc, M, N)
        modulated = (qp >= 0) & (kp >= 0) & kvalid
        Ha, K = gm.alpha.shape
        m = 0
        for c in range(K):
            a = gm.alpha[:, c].view(1, Ha, 1, 1, 1)
            s2 = (2 * gm.sigma[:, c] ** 2).view(1, Ha, 1, 1, 1)
            m = m + a * torch.exp(-d2 / s2)
        if gm.mode == "mul":
            mul = torch.where(modulated, m, torch.ones_like(m))
        else:
            add = torch.where(modulated, m, torch.zeros_like(m))

    if bias is None:
        return add, mul
    if isinstance(bias, torch.Tensor):
        t = bias
        while t.dim() < 4:
            t = t.unsqueeze(0)
        val = _pair_gather(t, bidx(t.shape[0]), hidx(t.shape[1]), q5, k5)
    elif isinstance(bias, IndexedBias):
        ind = bias.index.long().unsqueeze(1)
        idx = _pair_gather(ind, bidx(ind.shape[0]), hidx(1), q5, k5)
        Ht = bias.table.shape[0]
        val = bias.table[hidx(Ht), idx]
    elif isinstance(bias, RelPosBias):
        rh, rw = bias.rel_h, bias.rel_w
        Rh, Rw = rh.shape[-1], rw.shape[-1]
        if win is not None:
            # separable (timm rel_to_abs): rows of the block pick their shifted slice of rel_h / rel_w
            bq = win.bq
            rows_h, rows_w = ctx["rows"](rh), ctx["rows"](rw)       # blocked like q (view + copy)
            lead = rows_h.shape[:-2]
            gh = _rel_to_abs(rows_h.view(*lead, bq, bq, Rh).transpose(-2, -3), win.win_h).transpose(-2, -3)
            gw_ = _rel_to_abs(rows_w.view(*lead, bq, bq, Rw), win.win_w)
            if add is None:
                return (gh.reshape(*lead, M, win.win_h), gw_.reshape(*lead, M, win.win_w)), mul          # applied in place on the score tile by _attend
            val = (gh[..., :, None] + gw_[..., None, :]).reshape(*lead, M, win.win_h * win.win_w)
        else:
            qw, kw = bias.q_grid[1], bias.k_grid[1]
            qc = q5.clamp_min(0)
            kc = k5.clamp_min(0)
            iy = torch.div(kc, kw, rounding_mode="floor") - torch.div(qc, qw, rounding_mode="floor") + Rh // 2
            ix = kc.remainder(kw) - qc.remainder(qw) + Rw // 2
            bh, hh = bidx(rh.shape[0]), hidx(rh.shape[1])
            val = rh[bh, hh, qc, iy] + rw[bh, hh, qc, ix]
    else:  # pragma: no cover - validated earlier
        raise TypeError(type(bias))
    if not (isinstance(bias, RelPosBias) and win is not None):
        # dense / indexed biases have no entry for virtual border keys: they read 0.
        # Window rel-pos is defined on window positions, so virtual keys keep it.
        val = torch.where(kvalid, val, torch.zeros_like(val))
    add = val if add is None else add + val
    return add, mul


# ----------------------------------------------------------------------------------------------
# plans: how a layout splits into query groups
# ----------------------------------------------------------------------------------------------
class _Plan:
    cat_dim = 2          # dim of the per-chunk outputs (B', H', G, M, Dv) that chunks concatenate on
    safe = True
    units: int
    unit_cost: int       # score elements per unit

    def chunks(self, budget):
        per = max(1, budget // max(1, self.unit_cost))
        return [(u, min(u + per, self.units)) for u in range(0, self.units, per)]


class _DensePlan(_Plan):
    """Rows of queries against all keys (dense, causal, dense-mask layouts)."""
    cat_dim = 3

    def __init__(self, layout, B, H, Lq, Lk, dev):
        self.layout, self.B, self.H, self.Lq, self.Lk, self.dev = layout, B, H, Lq, Lk, dev
        self.units = Lq
        self.unit_cost = B * H * max(Lk, 1)
        self.safe = layout is not None

    def get(self, u0, u1, q, k, v):
        lay, dev = self.layout, self.dev
        kend = self.Lk
        mask = None
        if isinstance(lay, CausalLayout):
            kend = min(self.Lk, max(u1 - 1 + lay.offset + 1, lay.prefix, 1))
            i = torch.arange(u0, u1, device=dev)[:, None]
            j = torch.arange(kend, device=dev)[None, :]
            mask = lay.allowed(i, j)[None, None, None]
            if lay.kv_valid is not None:
                mask = mask & lay.kv_valid[:, None, None, None, :kend]
        elif isinstance(lay, MaskLayout):
            mask = lay.mask[:, :, None, u0:u1]
        qg = q[:, :, None, u0:u1]
        kg = k[:, :, None, :kend]
        vg = v[:, :, None, :kend]
        ctx = dict(qi=torch.arange(u0, u1, device=dev)[None],
                   ki=torch.arange(kend, device=dev).view(1, 1, 1, kend))
        return qg, kg, vg, mask, ctx

    def assemble(self, out, lse):
        return out[:, :, 0], (lse[:, :, 0] if lse is not None else None)


class _WindowPlan(_Plan):
    def __init__(self, lay: WindowLayout, B, H, dev):
        self.lay, self.B, self.H, self.dev = lay, B, H, dev
        self.units = lay.nby                                   # one unit = one row of blocks
        self.G = lay.nby * lay.nbx
        self.M, self.N = lay.bq * lay.bq, lay.win_h * lay.win_w
        self.unit_cost = B * H * lay.nbx * self.M * self.N
        self.safe = lay.may_have_empty_rows
        self.qi = lay.q_index(dev)
        self.ki = lay.k_index(dev)
        if lay.border == "clamp":
            sy, sx = lay.starts(dev)
            self.ry = sy[:, None] + torch.arange(lay.win_h, device=dev)
            self.cx = (sx[:, None] + torch.arange(lay.win_w, device=dev)).reshape(-1)
        if lay.kv_valid is not None:
            kv = lay.kv_valid.view(-1, 1, lay.h, lay.w, 1)
            self.valid_map = kv

    def _blocks_q(self, q):
        lay = self.lay
        B, H, _, D = q.shape
        bq, hq, wq = lay.bq, lay.h // lay.stride, lay.w // lay.stride
        return (q.view(B, H, lay.nby, bq, lay.nbx, bq, D).permute(0, 1, 2, 4, 3, 5, 6)
                .reshape(B, H, self.G, bq * bq, D))

    def _windows(self, t, r0, r1, pad_value=0.0):
        """(Bt, Ht, h*w, C) -> windows of block rows r0:r1: (Bt, Ht, (r1-r0)*nbx, wh*ww, C)."""
        lay = self.lay
        Bt, Ht, _, C = t.shape
        m = t.view(Bt, Ht, lay.h, lay.w, C)
        rc = r1 - r0
        if lay.border == "zero":
            a = r0 * lay.block
            b = r1 * lay.block + 2 * lay.halo
            # slice rows first, then pad, so only this chunk's strip is copied
            lo, hi = a - lay.halo, b - lay.halo
            strip = m[:, :, max(lo, 0):min(hi, lay.h)]
            strip = F.pad(strip, (0, 0, lay.halo, lay.halo, max(0, -lo), max(0, hi - lay.h)), value=pad_value)
            u = strip.unfold(2, lay.win, lay.block).unfold(3, lay.win, lay.block)   # (Bt,Ht,rc,nbx,C,win,win)
            return u.permute(0, 1, 2, 3, 5, 6, 4).reshape(Bt, Ht, rc * lay.nbx, self.N, C)
        rows = m[:, :, self.ry[r0:r1].reshape(-1)]                  # (Bt,Ht,rc*wh,w,C)
        g = rows[:, :, :, self.cx]                                   # (Bt,Ht,rc*wh,nbx*ww,C)
        g = g.view(Bt, Ht, rc, lay.win_h, lay.nbx, lay.win_w, C).permute(0, 1, 2, 4, 3, 5, 6)
        return g.reshape(Bt, Ht, rc * lay.nbx, self.N, C)

    def get(self, u0, u1, q, k, v):
        lay = self.lay
        g0, g1 = u0 * lay.nbx, u1 * lay.nbx
        qg = self._blocks_rows(q, u0, u1)
        kg = self._windows(k, u0, u1)
        vg = self._windows(v, u0, u1)
        mask = None
        if lay.kv_valid is not None:
            vm = self._windows(lay.kv_valid.view(lay.kv_valid.shape[0], 1, -1, 1), u0, u1, pad_value=True)
            mask = vm[..., 0].unsqueeze(-2)                          # (Bv, 1, Gc, 1, N)
        ctx = dict(qi=self.qi[g0:g1], ki=self.ki[None, None, g0:g1], win=lay,
                   rows=lambda t: self._blocks_rows(t, u0, u1))
        return qg, kg, vg, mask, ctx

    def _blocks_rows(self, t, u0, u1):
        """(Bt, Ht, Lq, C) natural -> (Bt, Ht, (u1-u0)*nbx, bq*bq, C) for block rows u0:u1."""
        lay = self.lay
        bq, wq = lay.bq, lay.w // lay.stride
        Bt, Ht, _, C = t.shape
        t = t[:, :, u0 * bq * wq: u1 * bq * wq]
        return (t.reshape(Bt, Ht, u1 - u0, bq, lay.nbx, bq, C).permute(0, 1, 2, 4, 3, 5, 6)
                .reshape(Bt, Ht, (u1 - u0) * lay.nbx, bq * bq, C))

    def assemble(self, out, lse):
        lay = self.lay
        B, H, G, M, Dv = out.shape
        bq = lay.bq
        o = out.view(B, H, lay.nby, lay.nbx, bq, bq, Dv).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, -1, Dv)
        l = None
        if lse is not None:
            l = lse.view(B, H, lay.nby, lay.nbx, bq, bq).permute(0, 1, 2, 4, 3, 5).reshape(B, H, -1)
        return o, l


class _RoutedPlan(_Plan):
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


class _SegmentPlan(_Plan):
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

    def assemble(self, out, lse, B, Lq):
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


# ----------------------------------------------------------------------------------------------
# chunk driver with optional recompute-in-backward
# ----------------------------------------------------------------------------------------------
class _Recompute(torch.autograd.Function):
    """Runs `run(i, tensors)` chunk by chunk without saving activations; backward recomputes each
    chunk under autograd and accumulates the input gradients."""

    @staticmethod
    def forward(ctx, run, n, cat_dim, need_lse, *tensors):
        with torch.no_grad():
            res = [run(i, tensors) for i in range(n)]
        ctx.run, ctx.n, ctx.cat_dim, ctx.need_lse = run, n, cat_dim, need_lse
        ctx.sizes = [r[0].shape[cat_dim] for r in res]
        ctx.save_for_backward(*tensors)
        out = torch.cat([r[0] for r in res], cat_dim)
        lse = torch.cat([r[1] for r in res], cat_dim) if need_lse else out.new_zeros(())
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        tensors = ctx.saved_tensors
        grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
        douts = torch.split(dout, ctx.sizes, ctx.cat_dim)
        dlses = torch.split(dlse, ctx.sizes, ctx.cat_dim) if (ctx.need_lse and dlse is not None) else None
        need = [i for i, t in enumerate(tensors) if ctx.needs_input_grad[4 + i]]
        for c in range(ctx.n):
            with torch.enable_grad():
                inp = [t.detach().requires_grad_(i in need) for i, t in enumerate(tensors)]
                o, l = ctx.run(c, inp)
                outs, gos = [o], [douts[c]]
                if dlses is not None and l is not None:
                    outs.append(l)
                    gos.append(dlses[c])
                gs = torch.autograd.grad(outs, [inp[i] for i in need], gos, allow_unused=True)
            for i, g in zip(need, gs):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (None, None, None, None, *grads)


def _bias_tensors(bias, score_mod):
    ts = []
    if isinstance(bias, torch.Tensor):
        ts.append(bias)
    elif bias is not None:
        ts.extend(bias.tensors())
    if score_mod is not None:
        ts.extend(score_mod.tensors())
    return ts


def _rebuild(bias, score_mod, ts):
    i = 0
    nb = None
    if isinstance(bias, torch.Tensor):
        nb, i = ts[0], 1
    elif isinstance(bias, IndexedBias):
        nb = IndexedBias.__new__(IndexedBias)
        nb.table, nb.index, i = ts[0], bias.index, 1
    elif isinstance(bias, RelPosBias):
        nb = RelPosBias.__new__(RelPosBias)
        nb.rel_h, nb.rel_w, nb.q_grid, nb.k_grid, i = ts[0], ts[1], bias.q_grid, bias.k_grid, 2
    ns = None
    if score_mod is not None:
        ns = GaussianMixture.__new__(GaussianMixture)
        ns.alpha, ns.sigma = ts[i], ts[i + 1]
        ns.grid, ns.mode, ns.num_prefix_tokens = score_mod.grid, score_mod.mode, score_mod.num_prefix_tokens
    return nb, ns


def _talking_heads(q, k, v, layout, scale, bias, score_mod, head_mix, return_lse):
    """Dense rows with logits mixed across heads before the softmax (and probabilities after it),
    chunked over queries so at most CHUNK_ELEMENTS logits exist at a time."""
    B, H, Lq, _ = q.shape
    Lk, dev = k.shape[2], q.device
    mask = layout.to_dense_mask() if layout is not None else None
    kidx = torch.arange(Lk, device=dev)
    if isinstance(bias, torch.Tensor):
        bias = bias.to(q.dtype)
    pre = head_mix.pre.to(q.dtype)
    post = head_mix.post.to(q.dtype) if head_mix.post is not None else None
    add, mul = _dense_bias(bias, score_mod, None, B, H, Lq, Lk, kidx, q.dtype, dev)   # (.., Lq, Lk)
    rows = max(1, CHUNK_ELEMENTS // max(1, B * H * Lk))
    outs, lses = [], []
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        s = torch.matmul(q[:, :, r0:r1], k.transpose(-1, -2)) * scale
        if mul is not None:
            s = s * mul[..., r0:r1, :]
        if add is not None:
            s = s + add[..., r0:r1, :]
        s = torch.einsum("bhij,hg->bgij", s, pre)
        if mask is not None:
            s = s.masked_fill(~mask[:, :, r0:r1], _NEG_INF)
        m = s.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        lsum = p.sum(-1, keepdim=True)
        p = p / torch.where(lsum > 0, lsum, torch.ones_like(lsum))
        if post is not None:
            p = torch.einsum("bhij,hg->bgij", p, post)
        outs.append(torch.matmul(p, v))
        lses.append((m + torch.log(lsum)).squeeze(-1))
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    lse = (torch.cat(lses, 2) if len(lses) > 1 else lses[0]) if return_lse else None
    return out, lse


def reference_attention(q, k, v, layout: Optional[Layout], scale: float, bias=None, score_mod=None,
                        return_lse: bool = False, head_mix=None):
    """Memory-aware PyTorch attention for every layout. Inputs are validated by the caller.
    Returns (out, lse or None); differentiable by autograd."""
    in_dtype = q.dtype
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if in_dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
    if head_mix is not None:
        out, lse = _talking_heads(q, k, v, layout, scale, bias, score_mod, head_mix, return_lse)
        return out.to(in_dtype), lse
    if layout is None and bias is None and score_mod is None and not return_lse:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.to(in_dtype), None

    if (isinstance(layout, RoutedLayout) and bias is None and score_mod is None and not return_lse
            and layout.kv_valid is None and layout.topk >= DENSE_ROUTED_FRACTION * layout.num_regions
            and layout.topk_index.shape[0] * layout.topk_index.shape[1] * Lq * Lk <= DENSE_ROUTED_MAX_MASK):
        # many small routed regions (BiFormer stage 3: top-16 of 49 regions of 4 tokens): one fused SDPA
        # over the dense mask beats gathering tiny per-region blocks (6x at that shape); no row is empty
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.to_dense_mask(), scale=scale)
        return out.to(in_dtype), None
    if isinstance(layout, KeyListLayout):
        from . import rowsparse
        if rowsparse.supports(layout, q, bias, score_mod):
            out, lse = rowsparse.rowsparse_attention(q, k, v, layout, scale, return_lse)
            return out.to(in_dtype), lse
        layout = layout.as_mask()

    dev = q.device
    if layout is None or isinstance(layout, (CausalLayout, MaskLayout)):
        plan = _DensePlan(layout, B, H, Lq, Lk, dev)
    elif isinstance(layout, WindowLayout):
        plan = _WindowPlan(layout, B, H, dev)
    elif isinstance(layout, RoutedLayout):
        plan = _RoutedPlan(layout, B, H, dev)
    elif isinstance(layout, SegmentLayout):
        plan = _SegmentPlan(layout, B, H, dev)
    else:  # pragma: no cover
        raise TypeError(f"unknown layout {type(layout).__name__}")

    chunks = plan.chunks(CHUNK_ELEMENTS)
    if not chunks:   # e.g. no segments at all: every row is fully masked
        out = q.new_zeros(B, H, Lq, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
        lse = q.new_full((B, H, Lq), _NEG_INF) if return_lse else None
        return out.to(in_dtype), lse
    if isinstance(bias, torch.Tensor):
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(bias.shape[0], bias.shape[1], Lq, Lk)     # view; only gathered pairs are read
    btensors = _bias_tensors(bias, score_mod)
    # bias and score-mod tensors compute in the working dtype
    btensors = [t.to(q.dtype) if t.is_floating_point() else t for t in btensors]
    need_lse = return_lse

    def run(ci, tensors):
        qq, kk, vv = tensors[:3]
        b_, s_ = _rebuild(bias, score_mod, tensors[3:])
        u0, u1 = chunks[ci]
        qg, kg, vg, mask, ctx = plan.get(u0, u1, qq, kk, vv)
        add, mul = _eval_bias(b_, s_, ctx, B, H) if (b_ is not None or s_ is not None) else (None, None)
        o, l = _attend(qg, kg, vg, scale, add=add, mask=mask, mul=mul, safe=plan.safe, need_lse=need_lse)
        return o, l

    total = sum(plan.unit_cost * (u1 - u0) for u0, u1 in chunks)
    tensors = [q, k, v, *btensors]
    grad_on = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if len(chunks) > 1 and grad_on and total > RECOMPUTE_ABOVE:
        out, lse = _Recompute.apply(run, len(chunks), plan.cat_dim, need_lse, *tensors)
        if not need_lse:
            lse = None
    else:
        res = [run(i, tensors) for i in range(len(chunks))]
        out = torch.cat([r[0] for r in res], plan.cat_dim) if len(res) > 1 else res[0][0]
        lse = (torch.cat([r[1] for r in res], plan.cat_dim) if len(res) > 1 else res[0][1]) if need_lse else None
    if isinstance(plan, _SegmentPlan):
        out, lse = plan.assemble(out, lse, B, Lq)
    else:
        out, lse = plan.assemble(out, lse)
    if out.shape[0] != B or out.shape[1] != H:
        out = out.expand(B, H, *out.shape[2:])
        lse = lse.expand(B, H, *lse.shape[2:]) if lse is not None else None
    return out.to(in_dtype), lse


# ----------------------------------------------------------------------------------------------
# naive dense oracle (tests)
# ----------------------------------------------------------------------------------------------
def _dense_bias(bias, score_mod, layout, B, H, Lq, Lk, kidx, dtype, dev):
    """Full (B|1, H|1, Lq, Nk) additive bias and multiplicative mod over key slots `kidx` (Nk,)
    natural key index, -1 for virtual keys."""
    add = mul = None
    i = torch.arange(Lq, device=dev)[:, None]
    j = kidx[None, :]
    virt = j < 0
    jc = j.clamp_min(0)
    if score_mod is not None:
        gm = score_mod
        P, gw = gm.num_prefix_tokens, gm.grid[1]
        qy, qx = (i - P) // gw, (i - P) % gw
        ky, kx = (jc - P) // gw, (jc - P) % gw
        d2 = ((qy - ky) ** 2 + (qx - kx) ** 2).to(dtype)
        m = (gm.alpha[:, :, None, None] * torch.exp(-d2 / (2 * gm.sigma[:, :, None, None] ** 2))).sum(1)
        mod = (i >= P) & (jc >= P) & ~virt
        if gm.mode == "mul":
            mul = torch.where(mod, m, torch.ones_like(m))[None]
        else:
            add = torch.where(mod, m, torch.zeros_like(m))[None]
    if bias is None:
        return add, mul
    if isinstance(bias, torch.Tensor):
        t = bias
        while t.dim() < 4:
            t = t.unsqueeze(0)
        val = t.expand(*t.shape[:2], Lq, Lk)[:, :, :, jc[0]]
    elif isinstance(bias, IndexedBias):
        ind = bias.index.long()[:, :, jc[0]]                          # (Bi, Lq, Nk)
        val = bias.table[:, ind].permute(1, 0, 2, 3)                 # (Bi, H, Lq, Nk)
    else:
        rh, rw = bias.rel_h, bias.rel_w
        Rh, Rw = rh.shape[-1], rw.shape[-1]
        if isinstance(layout, WindowLayout):
            lay = layout
            wq = lay.w // lay.stride
            qy, qx = i // wq, i % wq
            by, bx = qy // lay.bq, qx // lay.bq
            ly, lx = qy % lay.bq, qx % lay.bq
            if lay.border == "zero":
                # key slots are the padded map
                wp = lay.w + 2 * lay.halo
                slot = torch.arange(kidx.numel(), device=dev)[None, :]
                ky, kx = slot // wp, slot % wp                          # padded coords
                ry = ky - by * lay.block
                rx = kx - bx * lay.block
            else:
                sy, sx = lay.starts(dev)
                ky, kx = jc // lay.w, jc % lay.w
                ry = ky - sy[by]
                rx = kx - sx[bx]
            iy = (ry - ly + Rh // 2).clamp(0, Rh - 1)
            ix = (rx - lx + Rw // 2).clamp(0, Rw - 1)
        else:
            qh, qw = bias.q_grid
            kh, kw = bias.k_grid
            iy = (jc // kw - i // qw + Rh // 2).clamp(0, Rh - 1)
            ix = (jc % kw - i % qw + Rw // 2).clamp(0, Rw - 1)
        Lr = rh.shape[2]
        ar = torch.arange(Lr, device=dev)[:, None]
        val = rh[:, :, ar, iy.expand(Lq, -1)] + rw[:, :, ar, ix.expand(Lq, -1)]
    if not (isinstance(bias, RelPosBias) and isinstance(layout, WindowLayout)):
        val = torch.where(virt, torch.zeros_like(val), val)
    add = val if add is None else add + val
    return add, mul


def dense_oracle(q, k, v, layout=None, *, scale=None, bias=None, score_mod=None, head_mix=None):
    """Naive full-matrix attention from `layout.to_dense_mask()` (tests only). Virtual border keys of
    a zero-border window become explicit zero keys on the padded map. Returns (out, lse)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    kidx = torch.arange(Lk, device=dev)
    if isinstance(layout, WindowLayout) and layout.border == "zero":
        lay = layout
        hp, wp = lay.h + 2 * lay.halo, lay.w + 2 * lay.halo

        def padmap(t):
            m = t.view(B, H, lay.h, lay.w, t.shape[-1])
            return F.pad(m, (0, 0, lay.halo, lay.halo, lay.halo, lay.halo)).reshape(B, H, hp * wp, t.shape[-1])

        k, v = padmap(k), padmap(v)
        yy, xx = torch.arange(hp, device=dev)[:, None] - lay.halo, torch.arange(wp, device=dev)[None] - lay.halo
        inside = (yy >= 0) & (yy < lay.h) & (xx >= 0) & (xx < lay.w)
        kidx = torch.where(inside, yy * lay.w + xx, torch.full_like(yy * xx, -1)).reshape(-1)
        mask = layout.to_dense_mask(include_virtual=True)
    elif layout is not None:
        mask = layout.to_dense_mask()
    else:
        mask = None
    s = torch.matmul(q, k.transpose(-1, -2))
    add, mul = _dense_bias(bias, score_mod, layout, B, H, Lq, Lk, kidx, q.dtype, dev)
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
