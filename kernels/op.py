"""`attention`: input validation and the one router.

Backends and their implementations, in the order the router tries them:

- "triton" (CUDA tensors; CPU tensors only when forced under TRITON_INTERPRET=1):
  `triton.key_lists` (gather kernel) and `triton.block_sparse`; for key lists the gather kernel
  goes first only for sparse lists (`prefer_gather`), else the lists run as their element mask.
- "reference" (any device): `reference.key_lists` (listed pairs only), then `reference.core`.
- "flex" (CUDA, compiled FlexAttention): only when forced, for comparison.

`backend=None` tries "triton" then "reference" for CUDA tensors, "reference" otherwise. Every
implementation declares `can_run(q, k, v, layout, mods, dropout_p) -> (ok, reason)`; a layout a
backend cannot take is offered again as its `fallback()` (key lists -> their element mask). With
`backend=` forced and nothing able to run, the ValueError names each implementation's reason.
"""
from __future__ import annotations

from typing import Optional

import torch

from .bias import DenseBias, GaussianMixture, Modifier, TalkingHeads
from .layouts.base import Layout
from .tracing import find_tracer, is_fx_symbolic_tracing

__all__ = ["attention", "BACKENDS", "route", "prefer_gather"]

BACKENDS = (None, "reference", "triton", "flex")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def prefer_gather(layout, B: int, H: int) -> bool:
    """Key lists on the Triton backend: the gather kernel for lists keeping at most
    `triton.key_lists.GATHER_MAX_KEEP` of the keys or whose (B, H, Lq, Lk) element mask would exceed
    `MASK_MAX_ELEMENTS`, else the block-sparse kernel on the lists' element mask (tensor cores).
    Deterministic mode (`torch.use_deterministic_algorithms`) always takes the mask kernel: the
    gather backward adds dK/dV with atomics."""
    from .triton import key_lists as kl
    if torch.are_deterministic_algorithms_enabled():
        return False
    index, kv_len = layout.key_list_args()[:2]
    return index.shape[-1] <= kl.GATHER_MAX_KEEP * kv_len or B * H * layout.q_len * kv_len > kl.MASK_MAX_ELEMENTS


def _implementations(name, q, layout):
    if name == "triton":
        from .triton import block_sparse, key_lists
        if layout is not None and layout.lowers_to("key_lists") and prefer_gather(layout, *q.shape[:2]):
            return [key_lists, block_sparse]
        return [block_sparse, key_lists]
    if name == "reference":
        from .reference import core, key_lists
        return [key_lists, core]
    from . import flex
    return [flex]


def route(q, k, v, layout, mods, dropout_p, backend):
    """-> (implementation module, layout it runs). Raises ValueError naming why nothing can run."""
    names = [backend] if backend is not None else (["triton", "reference"] if q.device.type == "cuda"
                                                   else ["reference"])
    reasons = []
    fallback = []                       # built at most once, when first needed
    for name in names:
        for impl in _implementations(name, q, layout):
            lay = layout
            for attempt in range(2):
                if attempt:                     # offer the layout's equivalent (key lists -> mask)
                    if layout is None:
                        break
                    if not fallback:
                        fallback.append(layout.fallback())
                    lay = fallback[0]
                    if lay is None:
                        break
                ok, why = impl.can_run(q, k, v, lay, mods, dropout_p)
                if ok:
                    return impl, lay
                reasons.append(why)
    uniq = list(dict.fromkeys(r for r in reasons if r))
    raise ValueError(f"attention: backend={backend!r} cannot run this call: " + "; ".join(uniq))


def _validate(q, k, v, layout, scale, bias, score_mod, backend, head_mix, dropout_p):
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {n} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"attention: dtype {q.dtype} not supported; use float32, float16 or bfloat16 "
                         "(float64 only on the reference backend)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"attention: q, k, v must share (B, H); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"attention: head dims must be >= 1, got q/k {D} and v {v.shape[3]}")
    if k.shape[3] != D:
        raise ValueError(f"attention: q and k head dims differ: {D} vs {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    Lk = k.shape[2]
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a python float or None, got {type(scale).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if layout is not None:
        if not isinstance(layout, Layout):
            raise TypeError(f"attention: layout must come from a zoo.kernels builder (window_2d, routed_topk, "
                            f"segments, varlen, causal, from_dense_mask, key_lists, ...) or be None, "
                            f"got {type(layout).__name__}")
        layout.check(B, H, Lq, Lk)
    mods = []
    for arg, role, val in (("score_mod", "score_mod", score_mod), ("bias", "bias", bias),
                           ("head_mix", "head_mix", head_mix)):
        if val is None:
            continue
        if arg == "bias" and isinstance(val, torch.Tensor):
            val = DenseBias(val)
        if not isinstance(val, Modifier) or val.role != role:
            want = {"bias": "a Tensor, IndexedBias or RelPosBias", "score_mod": "a GaussianMixture",
                    "head_mix": "a TalkingHeads"}[arg]
            raise TypeError(f"attention: {arg} must be {want}, got {type(val).__name__}")
        val.check(B, H, Lq, Lk, layout)
        mods.append(val)
    return mods


def _fx_tracer(q, k, v, *args):
    """The torch.fx tracer when q, k, v or another argument is a traced value, else None."""
    for t in (q, k, v):
        if isinstance(t, torch.fx.Proxy):
            return t.tracer
    return find_tracer(args) if is_fx_symbolic_tracing() else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[Layout] = None, *,
              scale: Optional[float] = None, bias=None, score_mod: Optional[GaussianMixture] = None,
              return_lse: bool = False, backend: Optional[str] = None, head_mix: Optional[TalkingHeads] = None,
              dropout_p: float = 0.0):
    """Block-sparse softmax attention; see kernels/API.md for the full contract.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv) [, lse (B, H, Lq) fp32].
    """
    tracer = _fx_tracer(q, k, v, layout, bias, score_mod, head_mix)
    if tracer is not None:      # torch.fx symbolic tracing: the op is one leaf node
        return tracer.create_proxy(
            "call_function", attention, (q, k, v, layout),
            dict(scale=scale, bias=bias, score_mod=score_mod, return_lse=return_lse, backend=backend,
                 head_mix=head_mix, dropout_p=dropout_p))
    mods = _validate(q, k, v, layout, scale, bias, score_mod, backend, head_mix, dropout_p)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    impl, lay = route(q, k, v, layout, mods, dropout_p, backend)
    dropout = None
    if dropout_p > 0:
        from .reference.core import Dropout
        dropout = Dropout(dropout_p, torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    out, lse = impl.run(q, k, v, lay, scale, mods, return_lse, dropout)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out
