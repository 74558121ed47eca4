"""Triton key-list backend: each query gathers only its own listed keys (`key_lists` layouts).

The block-sparse kernels see key lists as an element mask; at 25 % random keys nearly every key
tile is partly kept, so they would compute (and mask) almost the whole score matrix. Here a program
owns BM query rows of one (batch, head) and walks their lists in chunks of BK slots: it loads the
slot's key ids, gathers those K and V rows ((BM, BK, D) tiles; a head's K/V stay in L2), forms the
logits as row-wise dot products and runs the online softmax over the chunks. Work and traffic
scale with the list length K, not with Lk. Dense rows (`dense_rows`, e.g. a cls query) walk keys
0..Lk-1 as their list.

Backward: one kernel recomputes the probabilities per chunk, accumulates dQ in registers and adds
dK, dV into fp32 buffers with atomics (a key may be listed by any query, so there is no tile that
owns it).

The per-pair dot products run on CUDA cores, the block-sparse kernel's tiles on tensor cores; which
of the two takes a call is the router's choice (kernels/op.py, `prefer_gather`).
"""
from typing import List, Tuple

import torch

from ._common import HAS_TRITON, bs, call_reason, contig, pow2_at_least_16, tl, triton

__all__ = ["can_run", "run", "keylist_attention"]

NAME = "triton"

BLOCK_M = 8             # query rows per program
GATHER_ELEMS = 2048     # BM * BK * head-dim elements per gathered tile: no register spills on sm_90
                        # for head dims 16-256 (ptxas -v on the compiled kernels)
# the router (kernels/op.py, prefer_gather) sends key lists here when they keep at most this fraction
# of the keys (per-pair dot products on CUDA cores vs block-sparse tiles on tensor cores, about 15x
# the fp16 throughput on H100: an estimate from that ratio), or when their element mask would
# exceed MASK_MAX_ELEMENTS
GATHER_MAX_KEEP = 1 / 16
MASK_MAX_ELEMENTS = 1 << 28


def can_run(q, k, v, layout, mods, dropout_p):
    why = call_reason(q, k, v, "key_lists", "the key-list gather kernel", layout, mods, dropout_p)
    return not why, why


if HAS_TRITON:

    @triton.jit
    def _chunk_keys(IDX, idx_row, rows, rvalid, dense, j, row_len, s_ij, Lk):
        """Key ids of list slots j for each row (dense rows: key j), and which slots are real."""
        in_list = rvalid[:, None] & (j[None, :] < row_len[:, None])
        listed = in_list & (dense == 0)[:, None]
        key = tl.load(IDX + idx_row[:, None] + j[None, :] * s_ij, mask=listed, other=-1)
        key = tl.where(dense[:, None], j[None, :], key)
        ok = in_list & (key >= 0) & (key < Lk)
        return tl.where(ok, key, 0), ok

    @triton.jit
    def _row_block(H, Lq, Lk, NK, DENSE, NMAX, BM: tl.constexpr):
        """This program's (batch, head), its BM query rows, each row's list length and the loop
        bound (a block holding a dense row walks max(Lk, K) slots: its listed rows may have K > Lk)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        rows = pid * BM + tl.arange(0, BM)
        dense = rows < DENSE
        n_slots = tl.where(pid * BM < DENSE, NMAX, NK)
        return bh // H, bh % H, bh, rows, rows < Lq, dense, tl.where(dense, Lk, NK), n_slots

    @triton.jit
    def _keylist_fwd(Q, K, V, IDX, OUT, LSE,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol,
                     s_ib, s_ih, s_il, s_ij,
                     H, Lq, Lk, NK, DENSE, NMAX, scale,
                     D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr):
        b, h, bh, rows, rvalid, dense, row_len, n_slots = _row_block(H, Lq, Lk, NK, DENSE, NMAX, BM)
        od = tl.arange(0, DP)
        odv = tl.arange(0, DVP)
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_ql + od[None, :],
                    mask=rvalid[:, None] & (od[None, :] < D), other=0.0).to(tl.float32)
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh
        idx_row = b * s_ib + h * s_ih + rows * s_il
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DVP], tl.float32)
        for c in range(0, n_slots, BK):
            j = c + tl.arange(0, BK)
            key, ok = _chunk_keys(IDX, idx_row, rows, rvalid, dense, j, row_len, s_ij, Lk)
            kg = tl.load(k_base + key[:, :, None] * s_kl + od[None, None, :],
                         mask=ok[:, :, None] & (od[None, None, :] < D), other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kg, axis=2) * scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vg = tl.load(v_base + key[:, :, None] * s_vl + odv[None, None, :],
                         mask=ok[:, :, None] & (odv[None, None, :] < DV), other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vg, axis=1)
            m_i = m_new
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        tl.store(OUT + b * s_ob + h * s_oh + rows[:, None] * s_ol + odv[None, :], out.to(OUT.dtype.element_ty),
                 mask=rvalid[:, None] & (odv[None, :] < DV))
        tl.store(LSE + bh * Lq + rows, lse, mask=rvalid)

    @triton.jit
    def _keylist_bwd(Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_db, s_dh, s_dl,
                     s_ib, s_ih, s_il, s_ij,
                     H, Lq, Lk, NK, DENSE, NMAX, scale,
                     D: tl.constexpr, DV_: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr):
        """dQ (stored), dK and dV (fp32 atomics into contiguous (B, H, Lk, *) buffers)."""
        b, h, bh, rows, rvalid, dense, row_len, n_slots = _row_block(H, Lq, Lk, NK, DENSE, NMAX, BM)
        od = tl.arange(0, DP)
        odv = tl.arange(0, DVP)
        dmask = od[None, :] < D
        dvmask = odv[None, :] < DV_
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_ql + od[None, :],
                    mask=rvalid[:, None] & dmask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dl + odv[None, :],
                     mask=rvalid[:, None] & dvmask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * Lq + rows, mask=rvalid, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)         # rows without keys: every p is 0 below
        delta = tl.load(DELTA + bh * Lq + rows, mask=rvalid, other=0.0)
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh
        dk_base = DK + bh * Lk * D
        dv_base = DV + bh * Lk * DV_
        idx_row = b * s_ib + h * s_ih + rows * s_il
        dq = tl.zeros([BM, DP], tl.float32)
        for c in range(0, n_slots, BK):
            j = c + tl.arange(0, BK)
            key, ok = _chunk_keys(IDX, idx_row, rows, rvalid, dense, j, row_len, s_ij, Lk)
            kmask = ok[:, :, None] & (od[None, None, :] < D)
            vmask = ok[:, :, None] & (odv[None, None, :] < DV_)
            kg = tl.load(k_base + key[:, :, None] * s_kl + od[None, None, :], mask=kmask, other=0.0).to(tl.float32)
            vg = tl.load(v_base + key[:, :, None] * s_vl + odv[None, None, :], mask=vmask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kg, axis=2) * scale
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.sum(do[:, None, :] * vg, axis=2)
            ds = p * (dp - delta[:, None])
            dq += tl.sum(ds[:, :, None] * kg, axis=1)
            tl.atomic_add(dv_base + key[:, :, None] * DV_ + odv[None, None, :], p[:, :, None] * do[:, None, :],
                          mask=vmask)
            tl.atomic_add(dk_base + key[:, :, None] * D + od[None, None, :], (ds * scale)[:, :, None] * q[:, None, :],
                          mask=kmask)
        tl.store(DQ + bh * Lq * D + rows[:, None] * D + od[None, :], dq * scale, mask=rvalid[:, None] & dmask)


def _launch_args(q, k, v, index, kv_len, dense_rows):
    B, H, Lq, D = q.shape
    Dv = v.shape[-1]
    DP, DVP = pow2_at_least_16(D), pow2_at_least_16(Dv)
    bk = max(1, min(16, GATHER_ELEMS // (BLOCK_M * max(DP, DVP))))
    common = (bs(index, 0), bs(index, 1), index.stride(2), index.stride(3),
              H, Lq, kv_len, index.shape[-1], dense_rows, max(kv_len, index.shape[-1]))
    meta = dict(D=D, DP=DP, DVP=DVP, BM=BLOCK_M, BK=bk, num_warps=4)
    return (triton.cdiv(Lq, BLOCK_M), B * H), common, meta


def _forward(q, k, v, index, kv_len, dense_rows, scale):
    q, k, v = contig(q), contig(k), contig(v)
    B, H, Lq, _ = q.shape
    out = torch.empty(B, H, Lq, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    grid, common, meta = _launch_args(q, k, v, index, kv_len, dense_rows)
    _keylist_fwd[grid](q, k, v, index, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                       k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                       out.stride(2), *common, float(scale), DV=v.shape[-1], **meta)
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, index, kv_len, dense_rows, scale):
    q, k, v = contig(q), contig(k), contig(v)
    dout = contig(dout)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(lse))
    delta = delta.contiguous()
    B, H, Lq, D = q.shape
    dq = torch.empty(B, H, Lq, D, device=q.device, dtype=torch.float32)
    dk = torch.zeros(B, H, kv_len, D, device=q.device, dtype=torch.float32)
    dv = torch.zeros(B, H, kv_len, v.shape[-1], device=q.device, dtype=torch.float32)
    grid, common, meta = _launch_args(q, k, v, index, kv_len, dense_rows)
    _keylist_bwd[grid](q, k, v, index, dout, lse, delta, dq, dk, dv, q.stride(0), q.stride(1), q.stride(2),
                       k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                       dout.stride(0), dout.stride(1), dout.stride(2), *common, float(scale),
                       DV_=v.shape[-1], **meta)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _KeyListTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, kv_len, dense_rows, scale):
        out, lse = _forward(q, k, v, index, kv_len, dense_rows, scale)
        ctx.save_for_backward(q, k, v, out, lse, index)
        ctx.meta = (kv_len, dense_rows, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, index = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(dout, dlse, q, k, v, out, lse, index, *ctx.meta)
        return dq, dk, dv, None, None, None, None


def keylist_attention(q, k, v, layout, scale: float):
    """q (B, H, Lq, D), k, v on CUDA (or CPU under TRITON_INTERPRET=1) -> (out, lse fp32)."""
    q, k, v = contig(q), contig(k), contig(v)
    index, kv_len, dense_rows, _ = layout.key_list_args()
    index = index.to(q.device)
    if torch.compiler.is_compiling():
        return torch.ops.zoo.attention_keylists(q, k, v, index, kv_len, dense_rows, float(scale))
    return _KeyListTriton.apply(q, k, v, index, kv_len, dense_rows, float(scale))


def run(q, k, v, layout, scale, mods, return_lse, dropout):
    """Backend entry (the router checked `can_run`)."""
    return keylist_attention(q, k, v, layout, scale)


if HAS_TRITON:
    @torch.library.custom_op("zoo::attention_keylists", mutates_args=())
    def _attention_keylists_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, kv_len: int,
                               dense_rows: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, index, kv_len, dense_rows, scale)

    @_attention_keylists_op.register_fake
    def _(q, k, v, index, kv_len, dense_rows, scale):
        B, H, Lq, _ = q.shape
        return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=torch.float32)

    @torch.library.custom_op("zoo::attention_keylists_bwd", mutates_args=())
    def _attention_keylists_bwd_op(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, index: torch.Tensor,
                                   kv_len: int, dense_rows: int, scale: float) -> List[torch.Tensor]:
        return list(_backward(dout, dlse, q, k, v, out, lse, index, kv_len, dense_rows, scale))

    @_attention_keylists_bwd_op.register_fake
    def _(dout, dlse, q, k, v, out, lse, index, kv_len, dense_rows, scale):
        return [t.new_empty(t.shape) for t in (q, k, v)]          # contiguous, as the kernel writes them

    def _setup(ctx, inputs, output):
        q, k, v, index, kv_len, dense_rows, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, index)
        ctx.meta = (kv_len, dense_rows, scale)

    def _op_backward(ctx, dout, dlse):
        q, k, v, out, lse, index = ctx.saved_tensors
        g = torch.ops.zoo.attention_keylists_bwd(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, index,
                                                 *ctx.meta)
        return g[0], g[1], g[2], None, None, None, None

    torch.library.register_autograd("zoo::attention_keylists", _op_backward, setup_context=_setup)
