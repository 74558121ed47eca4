"""Reference key-list backend: logits only at the listed (query, key) pairs (`key_lists` layouts).

Dense SDPA computes every Lq x Lk logit and a mask would only hide most of them. Here the listed
pairs of all B*H heads form one sparse CSR matrix with K entries per query row: `sampled_addmm`
computes the listed logits, the softmax runs on their (rows, K) view in place, and the
probability-weighted sum of the listed V rows is an `embedding_bag` (each query row a bag of K
rows; about twice as fast on CPU as the CSR x dense product), so the work scales with K instead
of Lk. The layout's dense rows (a cls row) hold K dummy entries of weight 0 there, so every row has
K entries; their real attention is a few small dense products ((B, H, d, Lk) logits) written into
their output rows.

No operand is copied. q, k and v are read as rows of their storage (a packed qkv projection gives
q, k, v as strided views of one buffer; its rows are addressed directly), and the output is laid
out like q: for a packed qkv that is (B, L, H, Dv), so merging heads afterwards is a view. The
backward computes dq on the same pattern (sampled logits' gradient, then an embedding bag of k
rows); dk and dv come from the entries scattered into a dense
(B, H, Lq, Lk) scratch buffer and two batched GEMMs on small maps, else from the transposed
pattern (entries sorted by key, built once per layout and cached on it).
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..layouts.base import unsupported
__all__ = ["can_run", "supports", "key_list_attention"]

NAME = "reference"

_NEG_INF = float("-inf")
# backward: maps of up to this many (B, H, Lq, Lk) elements take dk, dv from a dense scratch buffer
DENSE_TRANSPOSE_MAX = 1 << 24
_softmax_out = torch.ops.aten._softmax.out


def can_run(q, k, v, layout, mods, dropout_p):
    """Plain scaled attention (no modifiers, no dropout) on a layout given as key lists, in fp32 /
    fp64 (fp16 / bf16 are upcast on CPU), with at least one listed key per row."""
    why = unsupported("key_lists", "the reference key-list path", layout, mods, dropout_p)
    if why:
        return False, why
    if not supports(layout, q, None, None):
        return False, "no listed keys, only dense rows, or an unsupported dtype"
    return True, ""


def supports(layout, q, bias, score_mod) -> bool:
    """The sparse path covers plain scaled attention in fp32/fp64 (fp16/bf16 are upcast on CPU)."""
    dt = torch.float32 if (q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu") else q.dtype
    return (layout is not None and layout.lowers_to("key_lists") and bias is None and score_mod is None
            and dt in (torch.float32, torch.float64) and layout.index.shape[-1] > 0
            and layout.dense_rows < layout.q_len and q.numel() > 0)


def _csr(crow, col, values, size):
    with warnings.catch_warnings():     # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _row_geometry(t):
    """(base row, per-dim row steps) if every (b, h, l) vector of `t` is a whole row of its storage
    seen as a (rows, D) matrix; else None (the tensor is then copied once)."""
    D = t.shape[-1]
    st = [0 if n == 1 else s for n, s in zip(t.shape, t.stride())]
    if (st[3] != 1 and D != 1) or t.storage_offset() % D or any(s % D for s in st[:3]):
        return None
    return t.storage_offset() // D, tuple(s // D for s in st[:3])


def _storage_rows(t, geom):
    base, steps = geom
    return base + sum((n - 1) * s for n, s in zip(t.shape[:3], steps)) + 1


def _row_matrix(t, geom):
    """The storage of `t` as a (rows, D) matrix reaching its last (b, h, l) row (a view, no copy)."""
    return t.as_strided((_storage_rows(t, geom), t.shape[-1]), (t.shape[-1], 1), 0)


def _rows_of(geom, B, H, L, device):
    """(B, H, L) storage row of every vector."""
    base, (sb, sh, sl) = geom
    ar = lambda n, s: torch.arange(n, device=device) * s
    return base + ar(B, sb).view(B, 1, 1) + ar(H, sh).view(1, H, 1) + ar(L, sl).view(1, 1, L)


class _Frame:
    """Everything about the CSR structure that does not depend on which keys are listed: row order,
    row pointers, operand geometry. Shared by all layouts of one shape (a model builds a fresh
    layout per layer and step; only its column indices are new).

    Query rows are numbered in q's memory order (`perm` of the (B, H, L) dims) -- the "compact"
    order, which is also the output's layout. Dense rows (l < d) are empty rows here; each sparse
    row has K entries, so all values form one (rows, K) block."""

    def __init__(self, q, k, v, B, H, Lq, Lk, d, K):
        dev = q.device
        R = Lq - d
        self.shape, self.Lk, self.d, self.R, self.K = (B, H, Lq), Lk, d, R, K
        self.M, self.nnz = B * H * Lq, B * H * Lq * K
        self.geom = [_row_geometry(t) for t in (q, k, v)]
        if self.geom[0] is not None:
            qst = self.geom[0][1]
            self.perm = tuple(sorted(range(3), key=lambda i: -qst[i]))
            qrows = _rows_of(self.geom[0], B, H, Lq, dev).permute(self.perm).reshape(-1)
            if qrows.numel() > 1 and not bool((qrows[1:] > qrows[:-1]).all()):
                self.geom[0] = None        # overlapping or interleaved rows: use a copy of q
        if self.geom[0] is None:
            self.perm = (0, 1, 2)
            qrows = torch.arange(self.M, device=dev)
        contiguous = lambda t: (0, (t.shape[1] * t.shape[2], t.shape[2], 1))
        self.row_geom = [g if g is not None else contiguous(t) for g, t in zip(self.geom, (q, k, v))]
        n_qrows = int(qrows[-1]) + 1
        kv_rows = [_storage_rows(t, g) for t, g in zip((k, v), self.row_geom[1:])]
        big = max(self.nnz, self.M, n_qrows, B * H * Lk, *kv_rows) >= 2 ** 31 - 1
        self.itype = itype = torch.int64 if big else torch.int32
        self.qrows = qrows.to(itype)
        self.n_qrows = n_qrows
        self.col_base = [_rows_of(g, B, H, 1, dev).to(itype)[..., None] for g in self.row_geom[1:]]
        # v rows at a fixed offset from k rows (packed qkv, or separate tensors alike): the k columns
        # address v's storage matrix shifted by that many rows
        shift = self.row_geom[2][0] - self.row_geom[1][0]
        self.v_shift = shift if (self.row_geom[2][1] == self.row_geom[1][1] and shift >= 0) else None
        # K entries per row (the dense rows' are dummies of weight 0), as CSR row pointers over the
        # compact rows and over q's storage rows (rows of k / v interleaved with q's hold none)
        self.crow = torch.arange(0, self.nnz + 1, K, dtype=itype, device=dev)
        lens = torch.zeros(n_qrows + 1, dtype=torch.int64, device=dev)
        lens[qrows + 1] = K
        self.crow_q = lens.cumsum(0).to(itype)

    def columns(self, idx, has_pad, which, dummy_rows=0):
        """Storage rows of k (which=1) or v (2) at key positions idx (B|1, H|1, rows, X), flat in
        entry order (written into one fresh buffer); the first `dummy_rows` rows point at key 0."""
        g = self.row_geom[which]
        return self.keys_compact(idx, has_pad, g[1][2], self.col_base[which - 1], dummy_rows)

    # -- views between (B, H, L, X) and compact (M, X) -------------------------------------------
    def from_compact(self, flat, last=None):
        """Compact (M[, X]) -> (B, H, Lq[, X]) view."""
        inv = [self.perm.index(i) for i in range(3)]
        sizes = [self.shape[i] for i in self.perm]
        if last is None:
            return flat.view(sizes).permute(inv)
        return flat.view(*sizes, last).permute(*inv, 3)

    def to_compact(self, t):
        """(B, H, Lq, X) -> compact (M, X) (a view when t is laid out like the output)."""
        return t.permute(*self.perm, 3).reshape(self.M, t.shape[-1])

    def entries_view(self, x, rows, width):
        """Flat values in entry order of `rows` rows per (b, h) with `width` entries each -> (B, H,
        rows, width) view (rows = R, width = K: the sparse entries; d, Lk: the dense rows')."""
        sizes = [(self.shape[0], self.shape[1], rows)[i] for i in self.perm]
        inv = [self.perm.index(i) for i in range(3)]
        return x.view(*sizes, width).permute(*inv, 3)

    def rows_view(self, x, start, length):
        """Compact (M[, X]) -> view of the query rows l in [start, start + length), dims in q's
        memory order."""
        sizes = [self.shape[i] for i in self.perm] + list(x.shape[1:])
        return x.view(sizes).narrow(self.perm.index(2), start, length)

    def keys_compact(self, idx, has_pad, scale, base, dummy_rows=0):
        """(B|1, H|1, rows, X) key positions -> flat `base + scale * key` in entry order (one
        buffer); base broadcasts to (B, H, rows, 1); the first `dummy_rows` rows are taken as key 0
        (the dense rows' unused index entries may hold anything)."""
        B, H, _ = self.shape
        n_rows, X = idx.shape[2:]
        it = base.dtype
        base = base.expand(B, H, n_rows, 1).permute(*self.perm, 3)
        out = torch.empty([(B, H, n_rows)[i] for i in self.perm] + [X], dtype=it, device=base.device)
        out.copy_(idx.expand(B, H, n_rows, X).permute(*self.perm, 3))
        if dummy_rows:
            out.narrow(self.perm.index(2), 0, dummy_rows).zero_()
        if has_pad:
            out.clamp_min_(0)
        return torch.add(base, out, alpha=scale, out=out).view(-1)


_FRAMES: "OrderedDict[tuple, _Frame]" = OrderedDict()
_MAX_FRAMES = 16
_FRAMES_LOCK = threading.Lock()


def _frame(q, k, v, layout):
    B, H = q.shape[:2]
    key = (B, H, layout.q_len, layout.kv_len, layout.dense_rows, layout.index.shape[-1], q.device,
           *((t.shape[-1], t.stride(), t.storage_offset()) for t in (q, k, v)))
    with _FRAMES_LOCK:
        fr = _FRAMES.get(key)
        if fr is not None:
            _FRAMES.move_to_end(key)
            return fr
    fr = _Frame(q, k, v, B, H, layout.q_len, layout.kv_len, layout.dense_rows, layout.index.shape[-1])
    with _FRAMES_LOCK:
        _FRAMES[key] = fr
        while len(_FRAMES) > _MAX_FRAMES:
            _FRAMES.popitem(last=False)
    return fr


class _Pattern:
    """The listed keys of one layout on one frame: column indices (and the transpose, on demand)."""

    def __init__(self, layout, fr: _Frame):
        self.fr = fr
        idx = layout.index.to(fr.crow.device)                 # all rows; the dense rows' are dummies
        self.idx, self.has_pad = idx, layout.has_pad
        self.col_k = fr.columns(idx, layout.has_pad, 1, fr.d)
        self.col_v = self.col_k if fr.v_shift is not None else fr.columns(idx, layout.has_pad, 2, fr.d)
        self.pad = ((idx < 0).expand(*fr.shape, fr.K).permute(*fr.perm, 3).reshape(-1, fr.K)
                    if layout.has_pad else None)
        self._t = None

    def transpose(self):
        """Entries grouped by key (B, H, Lk order): value order, crow, q storage row, compact row.
        A stable int32 sort of the key ids (the dense rows' dummy entries sit at key 0, weight 0)."""
        if self._t is None:
            fr = self.fr
            B, H, _ = fr.shape
            dev, n = self.col_k.device, B * H * fr.Lk
            it = torch.int32 if n < 2 ** 31 - 1 else torch.int64
            base = torch.arange(0, n, fr.Lk, dtype=it, device=dev).view(B, H, 1, 1)
            sorted_kc, order = torch.sort(fr.keys_compact(self.idx, self.has_pad, 1, base, fr.d), stable=True)
            crow_t = torch.searchsorted(sorted_kc, torch.arange(n + 1, dtype=it, device=dev))
            row = (torch.arange(fr.M, dtype=fr.itype, device=dev).repeat_interleave(fr.K)
                   .index_select(0, order))                                        # compact row of each entry
            self._t = (order, crow_t.to(fr.itype), fr.qrows.index_select(0, row), row)
        return self._t


_WORKSPACE = threading.local()


def _scratch(n, dtype, device, slot="values", zero=True):
    """An (n,) buffer reused across calls of this thread, zeroed unless `zero=False` (inference:
    the logits die with the call, and a fresh buffer per call costs more in page faults than the
    attention's softmax). Each `slot` is a separate buffer."""
    ws = getattr(_WORKSPACE, "bufs", None)
    if ws is None:
        ws = _WORKSPACE.bufs = {}
    key = (slot, dtype, device, torch.is_inference_mode_enabled())    # inference tensors stay in inference mode
    buf = ws.get(key)
    if buf is None or buf.numel() < n:
        buf = ws[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].zero_() if zero else buf[:n]


def _head_major(t, slot):
    """t (B, H, L, D) copied into this thread's `slot` buffer, contiguous (inference only: the copy
    is overwritten by the next call)."""
    return _scratch(t.numel(), t.dtype, t.device, slot, zero=False).view(t.shape).copy_(t)


def _sampled(crow, col, size, a, b, alpha=1.0, scratch=False):
    """(a @ b.T) at the CSR entries as a flat (nnz,) tensor, computed in place into zeroed values
    (the out-of-place call copies its input first). `scratch`: into the thread's reused buffer."""
    n = col.shape[0]
    vals = _scratch(n, a.dtype, a.device) if scratch else torch.zeros(n, dtype=a.dtype, device=a.device)
    m = _csr(crow, col, vals, size)
    torch.sparse.sampled_addmm(m, a, b.t(), beta=0.0, alpha=alpha, out=m)
    return m.values()


def _bag_sum(col, weights, mat):
    """Row r: sum_j weights[r, j] * mat[col[r, j]], weights (rows, K): an embedding bag per row."""
    return F.embedding_bag(col.view(weights.shape), mat, mode="sum", per_sample_weights=weights)


def _spmm(crow, col, values, size, dense):
    """CSR (size) @ dense into a fresh output (beta=0 ignores its uninitialised contents; `mm` would
    zero a result and copy it)."""
    out = torch.empty(size[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, _csr(crow, col, values, size), dense, beta=0.0, out=out)


def _operands(fr, q, k, v):
    mats = []
    for t, g in zip((q, k, v), fr.geom):
        if g is None:               # a fresh contiguous copy at storage offset 0 (the frame's geometry)
            t = t.clone(memory_format=torch.contiguous_format)
            g = (0, (t.shape[1] * t.shape[2], t.shape[2], 1))
        mats.append(_row_matrix(t, g))
    if fr.v_shift:                  # None (own columns) or 0 (same rows as k): nothing to shift
        mats[2] = mats[2][fr.v_shift:]
    return mats


class _RowSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pat: _Pattern, scale: float, need_lse: bool):
        fr = pat.fr
        rq, rk, rv = _operands(fr, q, k, v)
        sizes = (rq.shape[0], rk.shape[0])
        # without autograd the probabilities are not kept: compute them in the reused scratch buffer
        s = _sampled(fr.crow_q, pat.col_k, sizes, rq, rk, alpha=scale, scratch=not any(ctx.needs_input_grad[:3]))
        sv = s.view(-1, fr.K)
        if pat.pad is not None:
            sv.masked_fill_(pat.pad, _NEG_INF)
        lse_c = torch.logsumexp(sv, -1) if need_lse else None
        _softmax_out(sv, -1, False, out=sv)
        if pat.pad is not None:
            torch.nan_to_num_(sv, nan=0.0)
        if fr.d:
            fr.rows_view(sv, 0, fr.d).zero_()              # the dense rows' dummy entries
        out_c = _bag_sum(pat.col_v, sv, rv)
        p_d = None
        if fr.d:                         # dense rows (all keys): small dense products; their rows are 0 so far
            p_d = torch.matmul(q[:, :, :fr.d], k.transpose(-1, -2)).mul_(scale)          # (B, H, d, Lk)
            if need_lse:
                fr.from_compact(lse_c)[:, :, :fr.d] = torch.logsumexp(p_d, -1)
            _softmax_out(p_d, -1, False, out=p_d)
            fr.from_compact(out_c, out_c.shape[-1])[:, :, :fr.d] = torch.matmul(p_d, v)
        lse = fr.from_compact(lse_c) if need_lse else None
        ctx.save_for_backward(q, k, v, s, p_d, out_c)
        ctx.pat, ctx.scale = pat, scale
        ctx.set_materialize_grads(False)
        return fr.from_compact(out_c, out_c.shape[-1]), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, p, p_d, out_c = ctx.saved_tensors
        pat, scale = ctx.pat, ctx.scale
        fr = pat.fr
        rq, rk, rv = _operands(fr, q, k, v)
        if dout is None:
            dout = torch.zeros_like(fr.from_compact(out_c, out_c.shape[-1]))
        dout_c = fr.to_compact(dout)
        row = (dout_c * out_c).sum(-1)                       # softmax backward: p * (dP - rowsum(dO * O))
        if dlse is not None:
            dl = fr.to_compact(dlse[..., None]).view(-1)
            row = row - torch.where(torch.isfinite(dl), dl, torch.zeros_like(dl))
        ds = _sampled(fr.crow, pat.col_v, (fr.M, rv.shape[0]), dout_c, rv)
        ds.view(-1, fr.K).sub_(row.view(-1, 1))
        ds = ds.mul_(p).mul_(scale)                         # 0 at the dense rows' dummy entries (p = 0)
        ds_d = None
        if fr.d:                         # (B, H, d, Lk)
            ds_d = torch.matmul(dout[:, :, :fr.d], v.transpose(-1, -2))
            ds_d = ds_d.sub_(fr.from_compact(row)[:, :, :fr.d, None]).mul_(p_d).mul_(scale)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dk = dv = None
        if need_q:
            dq = fr.from_compact(_bag_sum(pat.col_k, ds.view(-1, fr.K), rk), rk.shape[-1])
            if fr.d:
                dq[:, :, :fr.d] = torch.matmul(ds_d, k)          # those rows were 0 (dummy entries)
        B, H, _ = fr.shape
        if (need_k or need_v) and B * H * fr.shape[2] * fr.Lk <= DENSE_TRANSPOSE_MAX:
            # small maps: scatter the entries into a dense (B, H, Lq, Lk) scratch buffer and use
            # batched GEMMs; cheaper than sorting the entries by key for a transposed CSR
            buf = _scratch(B * H * fr.shape[2] * fr.Lk, p.dtype, p.device).view(B, H, fr.shape[2], fr.Lk)
            key = pat.idx[:, :, fr.d:]
            key = (key.clamp_min(0) if pat.has_pad else key).expand(B, H, fr.R, fr.K)
            # padded slots point at key 0 with value 0 and may share it with a real entry: add
            sparse_part = buf[:, :, fr.d:]
            put = sparse_part.scatter_add_ if pat.has_pad else sparse_part.scatter_

            def transposed_product(sparse, dense, rhs):       # (entries as a dense matrix)^T @ rhs
                put(-1, key, fr.entries_view(sparse, fr.shape[2], fr.K)[:, :, fr.d:])
                if fr.d:
                    buf[:, :, :fr.d] = dense
                return torch.matmul(buf.transpose(-1, -2), rhs)

            if need_k:
                dk = transposed_product(ds, ds_d, q)
            if need_v:
                if need_k:
                    buf.zero_()
                dv = transposed_product(p, p_d, dout)
        elif need_k or need_v:
            order, crow_t, qrow_t, row_t = pat.transpose()
            n = B * H * fr.Lk
            if need_k:
                dk = _spmm(crow_t, qrow_t, ds.index_select(0, order), (n, rq.shape[0]), rq).view(B, H, fr.Lk, -1)
            if need_v:
                dv = _spmm(crow_t, row_t, p.index_select(0, order), (n, fr.M), dout_c).view(B, H, fr.Lk, -1)
            if fr.d:                     # the dense rows' share: small (Lk x d) products
                d = fr.d
                if need_k:
                    dk.add_(torch.matmul(ds_d.transpose(-1, -2), q[:, :, :d]))
                if need_v:
                    dv.add_(torch.matmul(p_d.transpose(-1, -2), dout[:, :, :d]))
        return dq, dk, dv, None, None, None


def key_list_attention(q, k, v, layout, scale: float, return_lse: bool):
    """q (B, H, Lq, D), k, v fp32/fp64 -> (out (B, H, Lq, Dv), lse (B, H, Lq) or None).
    The output is laid out like q (see the module docstring)."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # inference: gathering keys and values from head-major copies is faster than from strided
        # views (a packed qkv spreads one head's rows over 3H times the memory); the copies go
        # into reused buffers (0.03 ms each at Sparsifiner's shape, no page faults)
        k = k if k.is_contiguous() else _head_major(k, "k")
        v = v if v.is_contiguous() else _head_major(v, "v")
    fr = _frame(q, k, v, layout)
    pat = layout._cache.get(fr)
    if pat is None:
        if len(layout._cache) >= _MAX_FRAMES:
            layout._cache.clear()
        pat = layout._cache[fr] = _Pattern(layout, fr)
    return _RowSparse.apply(q, k, v, pat, scale, return_lse)


def run(q, k, v, layout, scale, mods, return_lse, dropout):
    """Backend entry (the router checked `can_run`); under torch.compile (or `force_custom_op`)
    through the registered custom op (kernels/custom_op.py)."""
    from .. import custom_op
    if custom_op.use_custom_op():
        return custom_op.reference_op(q, k, v, layout, scale, mods, return_lse, dropout)
    return compute(q, k, v, layout, scale, mods, return_lse, dropout)


def compute(q, k, v, layout, scale, mods, return_lse, dropout):
    """fp16 / bf16 on CPU compute in fp32."""
    in_dtype = q.dtype
    if in_dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
    out, lse = key_list_attention(q, k, v, layout, scale, return_lse)
    return out.to(in_dtype), lse
