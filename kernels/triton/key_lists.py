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
from typing import List, NamedTuple, Tuple

import torch

from ._common import (HAS_TRITON, bs, call_reason, constexprs, contig, load_tile, pow2_at_least_16, row_base, rows,
                      store_tile, tl, triton)

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


class KeyIndex(NamedTuple):
    """The key lists (B|1, H|1, Lq, K) int: pointer, batch / head strides (0: broadcast), row and
    slot strides."""
    ptr: torch.Tensor
    s_b: int
    s_h: int
    s_l: int
    s_j: int


class ListDims(NamedTuple):
    """H heads, Lq queries, Lk keys, NK slots per list, the first DENSE query rows attend every key,
    NMAX slots walked by a block holding a dense row (max(Lk, NK)), softmax scale."""
    H: int
    Lq: int
    Lk: int
    NK: int
    DENSE: int
    NMAX: int
    scale: float


class Config(NamedTuple):
    """Constexpr: head dims (D, DV), padded to DP, DVP; BM query rows per program, BK slots per chunk."""
    D: int
    DV: int
    DP: int
    DVP: int
    BM: int
    BK: int


if HAS_TRITON:

    @triton.jit
    def _row_block(lists, dims, cfg):
        """This program's batch, head, b·H + h, its BM query rows and which exist, the walk of their
        lists (list row pointers, validity, dense flags, lengths) and the number of slots to walk
        (a block holding a dense row walks max(Lk, K) slots: its listed rows may have K > Lk)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // dims.H
        h = bh % dims.H
        rows = pid * cfg.BM + tl.arange(0, cfg.BM)
        rvalid = rows < dims.Lq
        dense = rows < dims.DENSE
        walk = (lists.ptr + b * lists.s_b + h * lists.s_h + rows * lists.s_l, rvalid, dense,
                tl.where(dense, dims.Lk, dims.NK))
        n_slots = tl.where(pid * cfg.BM < dims.DENSE, dims.NMAX, dims.NK)
        return b, h, bh, rows, rvalid, walk, n_slots

    @triton.jit
    def _chunk_keys(walk, lists, j, Lk):
        """Key ids of list slots j for each row (dense rows: key j), and which slots are real."""
        row_ptr, rvalid, dense, row_len = walk
        in_list = rvalid[:, None] & (j[None, :] < row_len[:, None])
        listed = in_list & (dense == 0)[:, None]
        key = tl.load(row_ptr[:, None] + j[None, :] * lists.s_j, mask=listed, other=-1)
        key = tl.where(dense[:, None], j[None, :], key)
        ok = in_list & (key >= 0) & (key < Lk)
        return tl.where(ok, key, 0), ok

    @triton.jit
    def _gather(T, b, h, key, ok, cols, n):
        """(BM, BK, len(cols)) fp32 tile of the rows `key` of a `Rows` bundle (0 where not ok)."""
        return tl.load(row_base(T, b, h) + key[:, :, None] * T.s_n + cols[None, None, :],
                       mask=ok[:, :, None] & (cols[None, None, :] < n), other=0.0).to(tl.float32)

    @triton.jit
    def _keylist_fwd(Q, K, V, OUT, LSE, lists, dims, cfg):
        b, h, bh, rows, rvalid, walk, n_slots = _row_block(lists, dims, cfg)
        od = tl.arange(0, cfg.DP)
        odv = tl.arange(0, cfg.DVP)
        q = load_tile(Q, b, h, rows, rvalid, od, cfg.D).to(tl.float32)
        m_i = tl.full([cfg.BM], float("-inf"), tl.float32)
        l_i = tl.zeros([cfg.BM], tl.float32)
        acc = tl.zeros([cfg.BM, cfg.DVP], tl.float32)
        for c in range(0, n_slots, cfg.BK):
            key, ok = _chunk_keys(walk, lists, c + tl.arange(0, cfg.BK), dims.Lk)
            kg = _gather(K, b, h, key, ok, od, cfg.D)
            s = tl.sum(q[:, None, :] * kg, axis=2) * dims.scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vg = _gather(V, b, h, key, ok, odv, cfg.DV)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vg, axis=1)
            m_i = m_new
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        store_tile(OUT, b, h, rows, rvalid, odv, cfg.DV, acc / l_safe[:, None])
        tl.store(LSE + bh * dims.Lq + rows, tl.where(empty, float("-inf"), m_i + tl.log(l_safe)), mask=rvalid)

    @triton.jit
    def _keylist_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, lists, dims, cfg):
        """dQ (stored), dK and dV (fp32 atomics into (B, H, Lk, *) buffers)."""
        b, h, bh, rows, rvalid, walk, n_slots = _row_block(lists, dims, cfg)
        od = tl.arange(0, cfg.DP)
        odv = tl.arange(0, cfg.DVP)
        q = load_tile(Q, b, h, rows, rvalid, od, cfg.D).to(tl.float32)
        do = load_tile(DO, b, h, rows, rvalid, odv, cfg.DV).to(tl.float32)
        lse = tl.load(LSE + bh * dims.Lq + rows, mask=rvalid, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)         # rows without keys: every p is 0 below
        delta = tl.load(DELTA + bh * dims.Lq + rows, mask=rvalid, other=0.0)
        dk_base = row_base(DK, b, h)
        dv_base = row_base(DV, b, h)
        dq = tl.zeros([cfg.BM, cfg.DP], tl.float32)
        for c in range(0, n_slots, cfg.BK):
            key, ok = _chunk_keys(walk, lists, c + tl.arange(0, cfg.BK), dims.Lk)
            kg = _gather(K, b, h, key, ok, od, cfg.D)
            vg = _gather(V, b, h, key, ok, odv, cfg.DV)
            s = tl.sum(q[:, None, :] * kg, axis=2) * dims.scale
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.sum(do[:, None, :] * vg, axis=2)
            ds = p * (dp - delta[:, None])
            dq += tl.sum(ds[:, :, None] * kg, axis=1)
            tl.atomic_add(dv_base + key[:, :, None] * DV.s_n + odv[None, None, :], p[:, :, None] * do[:, None, :],
                          mask=ok[:, :, None] & (odv[None, None, :] < cfg.DV))
            tl.atomic_add(dk_base + key[:, :, None] * DK.s_n + od[None, None, :],
                          (ds * dims.scale)[:, :, None] * q[:, None, :], mask=ok[:, :, None] & (od[None, None, :] < cfg.D))
        store_tile(DQ, b, h, rows, rvalid, od, cfg.D, dq * dims.scale)


def _launch_args(q, v, index, kv_len, dense_rows, scale):
    """-> grid, then the kernels' (lists, dims, cfg) bundles."""
    B, H, Lq, D = q.shape
    Dv = v.shape[-1]
    DP, DVP = pow2_at_least_16(D), pow2_at_least_16(Dv)
    bk = max(1, min(16, GATHER_ELEMS // (BLOCK_M * max(DP, DVP))))
    lists = KeyIndex(index, bs(index, 0), bs(index, 1), index.stride(2), index.stride(3))
    K = index.shape[-1]
    dims = ListDims(H, Lq, kv_len, K, dense_rows, max(kv_len, K), float(scale))
    return (triton.cdiv(Lq, BLOCK_M), B * H), (lists, dims, constexprs(Config(D, Dv, DP, DVP, BLOCK_M, bk)))


def _forward(q, k, v, index, kv_len, dense_rows, scale):
    q, k, v = contig(q), contig(k), contig(v)
    B, H, Lq, _ = q.shape
    out = torch.empty(B, H, Lq, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    grid, args = _launch_args(q, v, index, kv_len, dense_rows, scale)
    _keylist_fwd[grid](rows(q), rows(k), rows(v), rows(out), lse, *args, num_warps=4)
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
    grid, args = _launch_args(q, v, index, kv_len, dense_rows, scale)
    _keylist_bwd[grid](rows(q), rows(k), rows(v), rows(dout), lse, delta, rows(dq), rows(dk), rows(dv), *args,
                       num_warps=4)
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
