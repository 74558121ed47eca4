"""Reference path for `key_lists` layouts: logits only at the listed (query, key) pairs.

Dense SDPA computes every Lq x Lk logit and a mask would only hide most of them. Here the B*H
attention matrices are one block-diagonal sparse CSR matrix with K entries per query row:
`sampled_addmm` computes the listed logits, the softmax runs on their (rows, K) view, and a
CSR x dense product forms the output, so the work scales with K instead of Lk. The layout's dense
rows (a cls row) are rows of the same matrix. The backward uses the same pattern and its transpose
(built once per layout and cached on it).
"""
from __future__ import annotations

import warnings

import torch

from .layout import KeyListLayout

__all__ = ["supports", "rowsparse_attention"]

_NEG_INF = float("-inf")


def supports(layout, q, bias, score_mod) -> bool:
    """The sparse path covers plain scaled attention in fp32/fp64 (fp16/bf16 are upcast on CPU)."""
    dt = torch.float32 if (q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu") else q.dtype
    return (isinstance(layout, KeyListLayout) and bias is None and score_mod is None
            and dt in (torch.float32, torch.float64) and layout.index.shape[-1] > 0)


def _csr(crow, col, values, size):
    with warnings.catch_warnings():     # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _Pattern:
    """Block-diagonal CSR structure of one (layout, B, H): G = B*H groups of Lq rows. In each group the
    first d (dense) rows hold all Lk keys and the other R rows their K listed keys, so a group's
    values are [d*Lk | R*K] and `rows(values)` gives them as (G, d, Lk) and (G, R, K) views."""

    def __init__(self, layout: KeyListLayout, B: int, H: int, device):
        d, Lk, Lq = layout.dense_rows, layout.kv_len, layout.q_len
        idx = layout.index[:, :, d:].to(device)
        R, K = idx.shape[2], idx.shape[3]
        G = B * H
        self.G, self.d, self.R, self.K, self.Lk, self.Lq = G, d, R, K, Lk, Lq
        self.per = d * Lk + R * K                # entries per group
        self.M, self.nnz = G * Lq, G * self.per
        itype = torch.int32 if max(self.nnz, G * Lk) < 2 ** 31 - 1 else torch.int64
        col = torch.empty(G, self.per, dtype=itype, device=device)    # group g's keys offset by g*Lk
        base = torch.arange(0, G * Lk, Lk, dtype=itype, device=device)
        if d:
            col[:, :d * Lk] = (torch.arange(Lk, dtype=itype, device=device).repeat(d)[None] + base[:, None])
        sparse = idx.clamp_min(0) if layout.has_pad else idx
        torch.add(sparse.expand(B, H, R, K).reshape(B, H, R * K), base.view(B, H, 1),
                  out=col[:, d * Lk:].view(B, H, R * K))
        self.col = col.view(-1)
        starts = torch.cat([torch.arange(d, device=device) * Lk, d * Lk + torch.arange(R + 1, device=device) * K])
        crow = (torch.arange(G, device=device) * self.per)[:, None] + starts[None, :-1]
        self.crow = torch.cat([crow.reshape(-1), torch.tensor([self.nnz], device=device)]).to(itype)
        self.pad = (idx < 0).expand(B, H, R, K).reshape(G, R, K) if layout.has_pad else None
        self._t = None
        self._zeros = {}

    def rows(self, values):
        vals = values.view(self.G, self.per)
        return vals[:, :self.d * self.Lk].view(self.G, self.d, self.Lk), vals[:, self.d * self.Lk:].view(
            self.G, self.R, self.K)

    def matrix(self, values):                   # (G*Lq, G*Lk)
        return _csr(self.crow, self.col, values.reshape(-1), (self.M, self.G * self.Lk))

    def matrix_t(self, values):                 # the transpose, (G*Lk, G*Lq)
        if self._t is None:                     # entries counted per key, ordered by a stable sort on key
            order = torch.sort(self.col, stable=True).indices
            counts = torch.bincount(self.col.long(), minlength=self.G * self.Lk)
            crow_t = torch.zeros(self.G * self.Lk + 1, dtype=self.col.dtype, device=self.col.device)
            crow_t[1:] = counts.cumsum(0)
            row_of = torch.repeat_interleave(torch.arange(self.M, device=self.col.device),
                                             (self.crow[1:] - self.crow[:-1]).long())
            self._t = (order, crow_t, row_of[order].to(self.col.dtype))
        order, crow_t, col_t = self._t
        return _csr(crow_t, col_t, values.reshape(-1)[order], (self.G * self.Lk, self.M))

    def sampled(self, a, b, alpha=1.0):
        """(a @ b.T) at the pattern's entries, flat (nnz,) in row order."""
        z = self._zeros.get(a.dtype)
        if z is None:
            z = self._zeros[a.dtype] = torch.zeros(self.nnz, dtype=a.dtype, device=a.device)
        return torch.sparse.sampled_addmm(self.matrix(z), a, b.t(), beta=0.0, alpha=alpha).values()


def _softmax(pat: _Pattern, s, need_lse):
    """Row softmax of the flat logits; fully padded rows give p = 0 and lse = -inf."""
    ds, ss = pat.rows(s)
    if pat.pad is not None:
        ss = ss.masked_fill(pat.pad, _NEG_INF)
    if not pat.d:
        p = torch.softmax(ss, -1).reshape(-1)
    else:
        p = torch.empty_like(s)
        dp, sp = pat.rows(p)
        dp.copy_(torch.softmax(ds, -1))
        sp.copy_(torch.softmax(ss, -1))
    if pat.pad is not None:
        p = torch.nan_to_num_(p, nan=0.0)
    lse = None
    if need_lse:
        lse = torch.cat([torch.logsumexp(ds, -1), torch.logsumexp(ss, -1)], 1).reshape(-1)
    return p, lse


class _RowSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q2, k2, v2, pat: _Pattern, scale: float, need_lse: bool):
        p, lse = _softmax(pat, pat.sampled(q2, k2, alpha=scale), need_lse)
        out = pat.matrix(p) @ v2
        ctx.save_for_backward(q2, k2, v2, p, out)
        ctx.pat, ctx.scale = pat, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q2, k2, v2, p, out = ctx.saved_tensors
        pat, scale = ctx.pat, ctx.scale
        if dout is None:
            dout = torch.zeros_like(out)
        row = (dout * out).sum(-1)                          # softmax backward: p * (dP - rowsum(dO * O))
        if dlse is not None:
            row = row - torch.where(torch.isfinite(dlse), dlse, torch.zeros_like(dlse))
        ds = pat.sampled(dout, v2)
        row = row.view(pat.G, pat.Lq, 1)
        dense_part, sparse_part = pat.rows(ds)
        dense_part.sub_(row[:, :pat.d])
        sparse_part.sub_(row[:, pat.d:])
        ds = ds.mul_(p).mul_(scale)
        dq = pat.matrix(ds) @ k2 if ctx.needs_input_grad[0] else None
        dk = pat.matrix_t(ds) @ q2 if ctx.needs_input_grad[1] else None
        dv = pat.matrix_t(p) @ dout if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None, None, None


def rowsparse_attention(q, k, v, layout: KeyListLayout, scale: float, return_lse: bool):
    """q (B, H, Lq, D), k, v fp32/fp64 -> (out (B, H, Lq, Dv), lse (B, H, Lq) or None)."""
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[-1]
    key = (B, H, q.device)
    pat = layout._cache.get(key)
    if pat is None:
        pat = layout._cache[key] = _Pattern(layout, B, H, q.device)
    out, lse = _RowSparse.apply(q.reshape(B * H * Lq, D), k.reshape(B * H * Lk, D), v.reshape(B * H * Lk, Dv),
                                pat, scale, return_lse)
    return out.view(B, H, Lq, Dv), (lse.view(B, H, Lq) if return_lse else None)
