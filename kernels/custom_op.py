"""torch.library registration of the reference path, so `attention` runs under torch.compile
without graph breaks, and the generic (layout, modifiers, dropout) <-> op-schema flattening.

Layouts and modifiers flatten themselves (`Layout.flatten`, `Modifier.flatten`); here they are
packed as (layout tensors, floating modifier tensors, integer tensors, meta ints):

    meta = [dropout_p as float64 bits, layout code (0: dense), n layout tensors, n layout ints,
            *layout ints, n modifiers, (code, n float tensors, n int tensors, n ints, *ints) per modifier]

and with dropout the seed is the last integer tensor. Eager calls skip the op and use plain autograd
over the reference path (fastest); under `torch.compile` (or with `force_custom_op`) the call goes
through `zoo::attention_ref`, whose backward is a second op (`zoo::attention_ref_bwd`) that
recomputes the forward per chunk (with the same seeded dropout mask). The Triton backend registers
its ops in kernels/triton/ with the same flattening.
"""
from __future__ import annotations

import contextlib
import struct
from typing import List, Tuple

import torch

from .bias import Modifier
from .layouts.base import layout_class
from .reference.core import Dropout

__all__ = ["flatten", "unflatten", "force_custom_op", "use_custom_op", "reference_op"]

_FORCE = [False]


@contextlib.contextmanager
def force_custom_op(on: bool = True):
    """Route eager reference calls through the registered custom op (tests, FLOP counting)."""
    old = _FORCE[0]
    _FORCE[0] = on
    try:
        yield
    finally:
        _FORCE[0] = old


def use_custom_op() -> bool:
    return torch.compiler.is_compiling() or _FORCE[0]


def _p_bits(p: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(p)))[0]


def _p_from_bits(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def flatten(layout, mods=(), dropout=None):
    """-> (layout tensors, floating modifier tensors, integer tensors, meta ints)."""
    lt: List[torch.Tensor] = []
    fl: List[torch.Tensor] = []
    it: List[torch.Tensor] = []
    meta = [_p_bits(dropout.p if dropout is not None else 0.0)]
    if layout is None:
        meta += [0, 0, 0]
    else:
        ts, ints = layout.flatten()
        lt += ts
        meta += [layout.code, len(ts), len(ints), *ints]
    mods = [m for m in mods if m is not None]
    meta.append(len(mods))
    for m in mods:
        ft, its, ints = m.flatten()
        fl += ft
        it += its
        meta += [m.code, len(ft), len(its), len(ints), *ints]
    if dropout is not None:
        it.append(dropout.seed_tensor())
    return lt, fl, it, meta


def unflatten(lt, fl, it, meta, as_list=True):
    """Inverse of `flatten` (no re-validation: inputs were validated before flattening).
    -> (layout or None, modifiers tuple, Dropout or None)."""
    p = _p_from_bits(meta[0])
    code, n_lt, n_li = meta[1:4]
    i = 4
    layout = None
    if code:
        layout = layout_class(code).unflatten(list(lt[:n_lt]), list(meta[i:i + n_li]))
    i += n_li
    mods = []
    fi = ii = 0
    for _ in range(meta[i]):
        mcode, nf, ni, nn = meta[i + 1:i + 5]
        ints = list(meta[i + 5:i + 5 + nn])
        mods.append(Modifier.from_code(mcode).unflatten(list(fl[fi:fi + nf]), list(it[ii:ii + ni]), ints))
        fi, ii, i = fi + nf, ii + ni, i + 4 + nn
    dropout = Dropout(p, it[-1]) if p > 0 else None
    return layout, tuple(mods), dropout


def _reference(q, k, v, layout, scale, mods, dropout):
    """The reference implementation the router picks (key lists or plans), run directly."""
    from .op import route
    impl, lay = route(q, k, v, layout, mods, dropout.p if dropout is not None else 0.0, "reference")
    return impl.compute(q, k, v, lay, scale, mods, True, dropout)


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("zoo::attention_ref", mutates_args=())
def _attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lt: List[torch.Tensor],
                   fl: List[torch.Tensor], it: List[torch.Tensor], meta: List[int], scale: float
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    layout, mods, dropout = unflatten(lt, fl, it, meta)
    with torch.no_grad():
        out, lse = _reference(q, k, v, layout, scale, mods, dropout)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@_attention_ref.register_fake
def _(q, k, v, lt, fl, it, meta, scale):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=_lse_dtype(q))


def _autograd_on():
    """Custom-op impls run below the autograd dispatch keys; the reference backward recomputes the
    forward under autograd, so re-enable those keys for its duration."""
    ks = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "AutogradCPU",
                 "AutogradCUDA", "ADInplaceOrView"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None and ks.has(key):
            ks = ks.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), ks)


@torch.library.custom_op("zoo::attention_ref_bwd", mutates_args=())
def _attention_ref_bwd(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lt: List[torch.Tensor], fl: List[torch.Tensor], it: List[torch.Tensor], meta: List[int],
                       scale: float) -> List[torch.Tensor]:
    with _autograd_on(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, *fl)]
        layout, mods, dropout = unflatten(lt, leaves[3:], it, meta)
        out, lse = _reference(leaves[0], leaves[1], leaves[2], layout, scale, mods, dropout)
        fin = torch.isfinite(lse)
        lse = torch.where(fin, lse, torch.zeros_like(lse))
        grads = torch.autograd.grad([out, lse], leaves, [dout, torch.where(fin, dlse, torch.zeros_like(dlse))
                                                         .to(lse.dtype)], allow_unused=True)
    return [torch.zeros_like(t, memory_format=torch.contiguous_format) if g is None else g.contiguous()
            for t, g in zip(leaves, grads)]


@_attention_ref_bwd.register_fake
def _(dout, dlse, q, k, v, lt, fl, it, meta, scale):
    # contiguous like the real op's gradients (empty_like would keep a transposed input's strides)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, *fl)]


def _setup(ctx, inputs, output):
    q, k, v, lt, fl, it, meta, scale = inputs
    ctx.save_for_backward(q, k, v, *lt, *fl, *it)
    ctx.n = (len(lt), len(fl), len(it))
    ctx.meta, ctx.scale = meta, scale


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v = saved[:3]
    a, b, c = ctx.n
    lt, fl, it = list(saved[3:3 + a]), list(saved[3 + a:3 + a + b]), list(saved[3 + a + b:])
    grads = _attention_ref_bwd(dout.contiguous(), dlse.contiguous(), q, k, v, lt, fl, it, ctx.meta, ctx.scale)
    return grads[0], grads[1], grads[2], [None] * a, list(grads[3:]), [None] * c, None, None


torch.library.register_autograd("zoo::attention_ref", _backward, setup_context=_setup)


def reference_op(q, k, v, layout, scale, mods, return_lse, dropout):
    """The reference path through `zoo::attention_ref` -> (out, lse)."""
    lt, fl, it, meta = flatten(layout, mods, dropout)
    return _attention_ref(q, k, v, lt, fl, it, meta, float(scale))
