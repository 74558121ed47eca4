"""PyTorch reference backend: CPU training path and test oracle's sibling.

Every layout lowers itself to a *plan* (`Layout.reference_plan`): a list of query groups (a halo
block, a routed region, a segment, a chunk of rows), each with its own gathered keys. Groups are
processed in chunks whose score tensor stays under `CHUNK_ELEMENTS`, so no (B, H, Lq, Lk) tensor
and no fully gathered K/V is ever held at once. Small problems run in one chunk under plain
autograd (fastest); above `RECOMPUTE_ABOVE` total score elements the backward recomputes each chunk
(`_Recompute`), so memory stays at one chunk. Modifiers add their logit terms per chunk
(`Modifier.reference_terms`). Attention dropout draws its mask from a generator seeded per chunk,
so a recomputed chunk sees the same mask. fp16 / bf16 inputs on CPU compute in fp32 and the
output is cast back.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..bias import combine_reference_terms

__all__ = ["reference_attention", "can_run", "run", "compute", "Plan", "RowPlan", "CHUNK_ELEMENTS", "RECOMPUTE_ABOVE",
           "Dropout"]

NAME = "reference"
# score-matrix elements per chunk; and total elements above which backward recomputes chunks
CHUNK_ELEMENTS = 1 << 24
RECOMPUTE_ABOVE = 1 << 26

_NEG_INF = float("-inf")


def can_run(q, k, v, layout, mods, dropout_p):
    """Every layout with a reference plan, every modifier, dropout; any device and float dtype."""
    if layout is not None and not layout.lowers_to("reference"):
        return False, f"{type(layout).__name__} has no reference plan"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False, f"dtype {q.dtype} is not supported"
    return True, ""


class Dropout:
    """Attention dropout on probabilities with a seeded generator per chunk (reproducible, and the
    same mask when a chunk is recomputed in backward)."""

    def __init__(self, p: float, seed):
        self.p, self.seed = float(p), seed        # seed: an int or an int64 tensor (read when used)

    def seed_tensor(self):
        return self.seed if isinstance(self.seed, torch.Tensor) else torch.tensor(self.seed, dtype=torch.int64)

    def __call__(self, probs, chunk: int):
        g = torch.Generator(device=probs.device)
        g.manual_seed((int(self.seed) * 1000003 + int(chunk)) & 0x7FFFFFFFFFFFFFFF)
        keep = torch.rand(probs.shape, generator=g, device=probs.device, dtype=torch.float32) >= self.p
        return probs * keep.to(probs.dtype) * (1.0 / (1.0 - self.p))


# ----------------------------------------------------------------------------------------------
# core: attention over gathered groups
# ----------------------------------------------------------------------------------------------
def _attend(qg, kg, vg, scale, add=None, mask=None, mul=None, safe=True, need_lse=True, drop=None):
    """qg (..., M, D), kg (..., N, D), vg (..., N, Dv) -> out (..., M, Dv), lse (..., M) or None.
    `drop`: a function of the (unnormalised) probabilities (dropout), or None."""
    if drop is None and add is None and mul is None and mask is None and not need_lse \
            and qg.shape[:-2] == kg.shape[:-2] and kg.shape[:-1] == vg.shape[:-1] and qg.dim() >= 3:
        # plain attention per group: the fused SDPA kernel (fwd + bwd) is fastest
        lead = qg.shape[:-2]
        o = F.scaled_dot_product_attention(qg.reshape(-1, 1, *qg.shape[-2:]), kg.reshape(-1, 1, *kg.shape[-2:]),
                                           vg.reshape(-1, 1, *vg.shape[-2:]), scale=scale)
        return o.reshape(*lead, *o.shape[-2:]), None
    if drop is None and mul is None and not safe and not need_lse and qg.dim() >= 3:
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
        flat = lambda t, last: t.expand(*lead, t.shape[-2], last).reshape(-1, 1, t.shape[-2], last)  # noqa: E731
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
        out = torch.matmul(p if drop is None else drop(p), vg)
        lse = torch.logsumexp(s, dim=-1) if need_lse else None
        return out, lse
    # NaN-free softmax: rows without any admissible key give out 0 and lse -inf.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p if drop is None else drop(p), vg) / torch.where(l > 0, l, torch.ones_like(l))
    lse = (m + torch.log(l)).squeeze(-1) if need_lse else None
    return out, lse


# ----------------------------------------------------------------------------------------------
# plans: how a layout splits into query groups
# ----------------------------------------------------------------------------------------------
class Plan:
    """Base of the reference plans. `get(u0, u1, q, k, v)` -> (qg, kg, vg, mask, ctx) for units
    u0:u1, with ctx = dict(qi=(Gc, M) natural query index, ki=(Bk, Hk, Gc, N) natural key index
    (-1: virtual / pad) [, gb=(Gc,) batch of each group] [, local_relpos=fn(rel_h, rel_w)]);
    `assemble(out, lse)` -> (B, H, Lq, Dv), (B, H, Lq)."""
    cat_dim = 2          # dim of the per-chunk outputs (B', H', G, M, Dv) that chunks concatenate on
    safe = True
    units: int
    unit_cost: int       # score elements per unit

    def chunks(self, budget):
        per = max(1, budget // max(1, self.unit_cost))
        return [(u, min(u + per, self.units)) for u in range(0, self.units, per)]


class RowPlan(Plan):
    """Rows of queries against a key range (dense layout and layouts given by a row predicate:
    `layout.row_keys(u0, u1, Lk, device)` -> (k0, k1, mask (Bm, Hm, 1, rows, k1 - k0) or None))."""
    cat_dim = 3

    def __init__(self, layout, B, H, Lq, Lk, dev):
        self.layout, self.B, self.H, self.Lq, self.Lk, self.dev = layout, B, H, Lq, Lk, dev
        self.units = Lq
        self.unit_cost = B * H * max(Lk, 1)
        self.safe = layout is not None and layout.may_have_empty_rows

    def get(self, u0, u1, q, k, v):
        k0, k1, mask = (0, self.Lk, None) if self.layout is None else self.layout.row_keys(u0, u1, self.Lk, self.dev)
        ctx = dict(qi=torch.arange(u0, u1, device=self.dev)[None],
                   ki=torch.arange(k0, k1, device=self.dev).view(1, 1, 1, k1 - k0))
        return q[:, :, None, u0:u1], k[:, :, None, k0:k1], v[:, :, None, k0:k1], mask, ctx

    def assemble(self, out, lse):
        return out[:, :, 0], (lse[:, :, 0] if lse is not None else None)


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


def reference_attention(q, k, v, layout, scale: float, mods=(), return_lse: bool = False, dropout=None):
    """Memory-aware PyTorch attention for every layout. Inputs are validated by the caller; `mods`
    are Modifier objects (score mod before bias), `dropout` a `Dropout` or None.
    Returns (out, lse or None); differentiable by autograd."""
    in_dtype = q.dtype
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if in_dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
    mix = [m for m in mods if m.role == "head_mix"]
    mods = [m for m in mods if m.role != "head_mix"]
    p_drop = dropout.p if dropout is not None else 0.0
    if mix:
        out, lse = mix[0].reference_attention(q, k, v, layout, scale, mods, return_lse, dropout, CHUNK_ELEMENTS)
        return out.to(in_dtype), lse
    if layout is None and not mods and not return_lse and dropout is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).to(in_dtype), None
    if layout is not None:
        fast = layout.reference_shortcut(q, k, v, scale, mods, return_lse, p_drop)
        if fast is not None:
            return fast[0].to(in_dtype), fast[1]

    dev = q.device
    plan = RowPlan(None, B, H, Lq, Lk, dev) if layout is None else layout.reference_plan(B, H, dev)
    chunks = plan.chunks(CHUNK_ELEMENTS)
    if not chunks:   # e.g. no segments at all: every row is fully masked
        out = q.new_zeros(B, H, Lq, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
        lse = q.new_full((B, H, Lq), _NEG_INF) if return_lse else None
        return out.to(in_dtype), lse
    # modifier tensors compute in the working dtype
    sizes = [len(m.tensors()) for m in mods]
    mtensors = [t.to(q.dtype) for m in mods for t in m.tensors()]
    need_lse = return_lse

    def run(ci, tensors):
        qq, kk, vv = tensors[:3]
        ms, i = [], 3
        for m, n in zip(mods, sizes):
            ms.append(m.with_tensors(tensors[i:i + n]))
            i += n
        u0, u1 = chunks[ci]
        qg, kg, vg, mask, ctx = plan.get(u0, u1, qq, kk, vv)
        add, mul = combine_reference_terms(ms, ctx) if ms else (None, None)
        drop = (lambda p: dropout(p, ci)) if dropout is not None else None
        return _attend(qg, kg, vg, scale, add=add, mask=mask, mul=mul, safe=plan.safe, need_lse=need_lse,
                       drop=drop)

    total = sum(plan.unit_cost * (u1 - u0) for u0, u1 in chunks)
    tensors = [q, k, v, *mtensors]
    grad_on = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if len(chunks) > 1 and grad_on and total > RECOMPUTE_ABOVE:
        out, lse = _Recompute.apply(run, len(chunks), plan.cat_dim, need_lse, *tensors)
        if not need_lse:
            lse = None
    else:
        res = [run(i, tensors) for i in range(len(chunks))]
        out = torch.cat([r[0] for r in res], plan.cat_dim) if len(res) > 1 else res[0][0]
        lse = (torch.cat([r[1] for r in res], plan.cat_dim) if len(res) > 1 else res[0][1]) if need_lse else None
    out, lse = plan.assemble(out, lse)
    if out.shape[0] != B or out.shape[1] != H:
        out = out.expand(B, H, *out.shape[2:])
        lse = lse.expand(B, H, *lse.shape[2:]) if lse is not None else None
    return out.to(in_dtype), lse


def run(q, k, v, layout, scale, mods, return_lse, dropout):
    """Backend entry (the router checked `can_run`); under torch.compile (or `force_custom_op`) the
    call goes through the registered custom op (kernels/custom_op.py)."""
    from .. import custom_op
    if custom_op.use_custom_op():
        return custom_op.reference_op(q, k, v, layout, scale, mods, return_lse, dropout)
    return reference_attention(q, k, v, layout, scale, mods, return_lse, dropout)


compute = reference_attention
