"""`attention`: input validation and the single backend dispatch point."""
from __future__ import annotations

from typing import Optional

import torch

from .bias import GaussianMixture, IndexedBias, RelPosBias, TalkingHeads
from .layout import CausalLayout, KeyListLayout, Layout, MaskLayout, WindowLayout

__all__ = ["attention", "BACKENDS"]

BACKENDS = (None, "reference", "triton", "flex")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate(q, k, v, layout, scale, bias, score_mod, backend, head_mix=None):
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {n} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    ok = _DTYPES + ((torch.float64,) if backend in (None, "reference") and q.device.type == "cpu" else ())
    if q.dtype not in ok:
        raise ValueError(f"attention: dtype {q.dtype} not supported; use float32, float16 or bfloat16 "
                         "(float64 only on the CPU reference backend)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"attention: q, k, v must share (B, H); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"attention: q and k head dims differ: {D} vs {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    Lk = k.shape[2]
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a python float or None, got {type(scale).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if layout is not None:
        if not isinstance(layout, Layout):
            raise TypeError(f"attention: layout must come from a zoo.kernels builder (window_2d, routed_topk, "
                            f"segments, varlen, causal, from_dense_mask, key_lists) or be None, got {type(layout).__name__}")
        layout.check(B, H, Lq, Lk)
    if bias is not None:
        if isinstance(bias, torch.Tensor):
            if not bias.is_floating_point():
                raise ValueError(f"attention: a tensor bias must be floating point, got {bias.dtype}")
            try:
                torch.broadcast_shapes(bias.shape, (B, H, Lq, Lk))
            except RuntimeError:
                raise ValueError(f"attention: bias of shape {tuple(bias.shape)} does not broadcast to "
                                 f"(B, H, Lq, Lk) = {(B, H, Lq, Lk)}") from None
            if bias.dim() > 4 or torch.broadcast_shapes(bias.shape, (B, H, Lq, Lk)) != (B, H, Lq, Lk):
                raise ValueError(f"attention: bias of shape {tuple(bias.shape)} does not broadcast to "
                                 f"(B, H, Lq, Lk) = {(B, H, Lq, Lk)}")
        elif isinstance(bias, IndexedBias):
            bias.check(B, H, Lq, Lk)
        elif isinstance(bias, RelPosBias):
            bias.check(B, H, Lq, Lk, layout)
            if isinstance(layout, WindowLayout):
                for n, t, need in (("rel_h", bias.rel_h, layout.win_h), ("rel_w", bias.rel_w, layout.win_w)):
                    if t.shape[-1] // 2 < need - 1:
                        raise ValueError(f"RelPosBias: {n} has R={t.shape[-1]} but the window needs offsets up to "
                                         f"±{need - 1} (R >= {2 * need - 1})")
            else:
                for n, t, a, b in (("rel_h", bias.rel_h, bias.q_grid[0], bias.k_grid[0]),
                                   ("rel_w", bias.rel_w, bias.q_grid[1], bias.k_grid[1])):
                    if t.shape[-1] // 2 < max(a, b) - 1:
                        raise ValueError(f"RelPosBias: {n} has R={t.shape[-1]} but grids {bias.q_grid}/{bias.k_grid} "
                                         f"need R >= {2 * max(a, b) - 1}")
        else:
            raise TypeError("attention: bias must be a Tensor, IndexedBias or RelPosBias, got "
                            f"{type(bias).__name__}")
    if score_mod is not None:
        if not isinstance(score_mod, GaussianMixture):
            raise TypeError(f"attention: score_mod must be a GaussianMixture, got {type(score_mod).__name__}")
        score_mod.check(B, H, Lq, Lk)
    if head_mix is not None:
        if not isinstance(head_mix, TalkingHeads):
            raise TypeError(f"attention: head_mix must be a TalkingHeads, got {type(head_mix).__name__}")
        head_mix.check(B, H, Lq, Lk)
        if layout is not None and not isinstance(layout, (CausalLayout, MaskLayout, KeyListLayout)):
            raise ValueError(f"attention: head_mix works with dense, causal, from_dense_mask and key_lists "
                             f"layouts, got {type(layout).__name__}")
        if backend in ("triton", "flex"):
            raise ValueError(f"attention: head_mix runs on the reference backend only (it needs every head's "
                             f"logits at once), got backend={backend!r}")


def _choose_backend(q, backend):
    if backend is None:
        return "triton" if q.device.type == "cuda" else "reference"
    if backend in ("triton", "flex") and q.device.type != "cuda":
        from . import triton_attention as _ta
        if not (backend == "triton" and _ta.interpreter_enabled()):
            raise ValueError(f"attention: backend={backend!r} needs CUDA tensors (got {q.device}); "
                             "use backend='reference' on CPU")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[Layout] = None, *,
              scale: Optional[float] = None, bias=None, score_mod: Optional[GaussianMixture] = None,
              return_lse: bool = False, backend: Optional[str] = None, head_mix: Optional[TalkingHeads] = None):
    """Block-sparse softmax attention; see kernels/API.md for the full contract.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv) [, lse (B, H, Lq) fp32].
    """
    _validate(q, k, v, layout, scale, bias, score_mod, backend, head_mix)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    be = "reference" if head_mix is not None else _choose_backend(q, backend)
    if be == "flex" and isinstance(layout, KeyListLayout):
        layout = layout.as_mask()     # Flex takes key lists as their element mask
    if be == "reference":
        from .custom_op import reference_dispatch
        out, lse = reference_dispatch(q, k, v, layout, scale, bias, score_mod, return_lse, head_mix)
    elif be == "triton":
        from .triton_attention import triton_attention
        out, lse = triton_attention(q, k, v, layout, scale, bias, score_mod, return_lse)
    else:
        from .flex import flex_attention_backend
        out, lse = flex_attention_backend(q, k, v, layout, scale, bias, score_mod, return_lse)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out
