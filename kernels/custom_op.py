"""torch.library registration so `attention` runs under torch.compile without graph breaks.

Layouts and typed biases are flattened to (tensor lists, int list) for the op schema and rebuilt
inside the op. Eager calls skip the op and use plain autograd over the reference path (fastest);
under `torch.compile` (or with `force_custom_op`) the call goes through `zoo::attention_ref`,
whose backward is a second op (`zoo::attention_ref_bwd`) that recomputes the forward per chunk.
The Triton backend registers its own ops in triton_attention.py with the same flattening.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from .bias import GaussianMixture, IndexedBias, RelPosBias, TalkingHeads
from .layout import CausalLayout, KeyListLayout, MaskLayout, RoutedLayout, SegmentLayout, WindowLayout
from .reference import reference_attention

__all__ = ["flatten", "unflatten", "reference_dispatch", "force_custom_op", "META_LEN"]

META_LEN = 22
_LKIND = {None: 0, WindowLayout: 1, RoutedLayout: 2, SegmentLayout: 3, CausalLayout: 4, MaskLayout: 5,
          KeyListLayout: 6}
_FORCE = [False]


@contextlib.contextmanager
def force_custom_op(on: bool = True):
    """Route eager reference calls through the registered custom op (tests)."""
    old = _FORCE[0]
    _FORCE[0] = on
    try:
        yield
    finally:
        _FORCE[0] = old


def flatten(layout, bias, score_mod, head_mix=None):
    """-> (layout tensors, float bias/score tensors, int bias tensors, meta ints)."""
    meta = [0] * META_LEN
    lt: List[torch.Tensor] = []
    if layout is not None:
        meta[0] = _LKIND[type(layout)]
    if isinstance(layout, WindowLayout):
        meta[1:8] = [layout.h, layout.w, layout.block, layout.halo, int(layout.border == "clamp"), layout.stride,
                     int(layout.kv_valid is not None)]
        if layout.kv_valid is not None:
            lt.append(layout.kv_valid)
    elif isinstance(layout, RoutedLayout):
        meta[1:3] = [layout.region_size, int(layout.kv_valid is not None)]
        lt.append(layout.topk_index)
        if layout.kv_valid is not None:
            lt.append(layout.kv_valid)
    elif isinstance(layout, SegmentLayout):
        lt += [layout.q_ids, layout.kv_ids]
    elif isinstance(layout, CausalLayout):
        meta[1:5] = [layout.q_len, layout.kv_len, layout.prefix, int(layout.kv_valid is not None)]
        if layout.kv_valid is not None:
            lt.append(layout.kv_valid)
    elif isinstance(layout, MaskLayout):
        lt.append(layout.mask)
    elif isinstance(layout, KeyListLayout):
        meta[1:4] = [layout.kv_len, layout.dense_rows, int(layout.has_pad)]
        lt.append(layout.index)
    fl: List[torch.Tensor] = []
    it: List[torch.Tensor] = []
    if isinstance(bias, torch.Tensor):
        meta[8] = 1
        fl.append(bias)
    elif isinstance(bias, IndexedBias):
        meta[8] = 2
        fl.append(bias.table)
        it.append(bias.index)
    elif isinstance(bias, RelPosBias):
        meta[8] = 3
        fl += [bias.rel_h, bias.rel_w]
        if bias.q_grid is not None:
            meta[9:14] = [1, *bias.q_grid, *bias.k_grid]
    if score_mod is not None:
        meta[14:20] = [1, int(score_mod.mode == "add"), score_mod.num_prefix_tokens, *score_mod.grid, 0]
        fl += [score_mod.alpha, score_mod.sigma]
    if head_mix is not None:
        meta[20:22] = [1, int(head_mix.post is not None)]
        fl += head_mix.tensors()
    return lt, fl, it, meta


def _new(cls, **kw):
    obj = cls.__new__(cls)
    obj.__dict__.update(kw)
    return obj


def unflatten(lt, fl, it, meta):
    """Inverse of `flatten` (no re-validation: inputs were validated before flattening)."""
    kind = meta[0]
    layout = None
    if kind == 1:
        h, w, block, halo, clamp, stride, has_kv = meta[1:8]
        layout = WindowLayout(h, w, block, halo, border="clamp" if clamp else "zero", stride=stride,
                              kv_valid=lt[0] if has_kv else None)
    elif kind == 2:
        S, has_kv = meta[1:3]
        layout = _routed_unchecked(lt[0], S, lt[1] if has_kv else None)
    elif kind == 3:
        layout = SegmentLayout(lt[0], lt[1])
    elif kind == 4:
        ql, kl, prefix, has_kv = meta[1:5]
        layout = CausalLayout(ql, kl, prefix, lt[0] if has_kv else None)
    elif kind == 5:
        layout = MaskLayout(lt[0])
    elif kind == 6:
        kv_len, d, has_pad = meta[1:4]
        layout = _new(KeyListLayout, index=lt[0], kv_len=kv_len, dense_rows=d, has_pad=bool(has_pad),
                      q_len=lt[0].shape[2], batch=None, heads=None, may_have_empty_rows=bool(has_pad), _cache={})
    bias = None
    i = 0
    if meta[8] == 1:
        bias, i = fl[0], 1
    elif meta[8] == 2:
        bias, i = _new(IndexedBias, table=fl[0], index=it[0]), 1
    elif meta[8] == 3:
        has_grid = meta[9]
        bias = _new(RelPosBias, rel_h=fl[0], rel_w=fl[1], q_grid=tuple(meta[10:12]) if has_grid else None,
                    k_grid=tuple(meta[12:14]) if has_grid else None)
        i = 2
    score_mod = None
    if meta[14]:
        score_mod = _new(GaussianMixture, alpha=fl[i], sigma=fl[i + 1], grid=tuple(meta[17:19]),
                         mode="add" if meta[15] else "mul", num_prefix_tokens=meta[16])
        i += 2
    head_mix = None
    if meta[20]:
        head_mix = _new(TalkingHeads, pre=fl[i], post=fl[i + 1] if meta[21] else None)
    return layout, bias, score_mod, head_mix


def _routed_unchecked(topk_index, S, kv_valid):
    lay = RoutedLayout.__new__(RoutedLayout)
    B, Hk, nR, k = topk_index.shape
    lay.topk_index, lay.region_size, lay.num_regions, lay.topk = topk_index, S, nR, k
    lay.q_len = lay.kv_len = nR * S
    lay.batch, lay.heads = B, (Hk if Hk > 1 else None)
    lay.kv_valid = kv_valid
    lay.may_have_empty_rows = kv_valid is not None
    eq = topk_index[..., :, None] == topk_index[..., None, :]
    lay.dup = torch.tril(eq, diagonal=-1).any(-1)
    return lay


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("zoo::attention_ref", mutates_args=())
def _attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lt: List[torch.Tensor],
                   fl: List[torch.Tensor], it: List[torch.Tensor], meta: List[int], scale: float
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    layout, bias, sm, hm = unflatten(lt, fl, it, meta)
    with torch.no_grad():
        out, lse = reference_attention(q, k, v, layout, scale, bias, sm, True, hm)
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
        layout, bias, sm, hm = unflatten(lt, leaves[3:], it, meta)
        out, lse = reference_attention(leaves[0], leaves[1], leaves[2], layout, scale, bias, sm, True, hm)
        fin = torch.isfinite(lse)
        lse = torch.where(fin, lse, torch.zeros_like(lse))
        grads = torch.autograd.grad([out, lse], leaves, [dout, torch.where(fin, dlse, torch.zeros_like(dlse))
                                                         .to(lse.dtype)], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(leaves, grads)]


@_attention_ref_bwd.register_fake
def _(dout, dlse, q, k, v, lt, fl, it, meta, scale):
    return [torch.empty_like(t) for t in (q, k, v, *fl)]


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


def reference_dispatch(q, k, v, layout, scale, bias, score_mod, return_lse, head_mix=None):
    compiling = torch.compiler.is_compiling()
    if not (compiling or _FORCE[0]):
        return reference_attention(q, k, v, layout, scale, bias, score_mod, return_lse, head_mix)
    lt, fl, it, meta = flatten(layout, bias, score_mod, head_mix)
    out, lse = _attention_ref(q, k, v, lt, fl, it, meta, float(scale))
    return out, lse
