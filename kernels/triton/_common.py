"""What every Triton kernel of zoo.kernels shares: the optional import, the interpreter switch,
input checks, stride and padding helpers, and the `Rows` bundle with its tile load/store helpers.

Kernels take their arguments as named bundles (typing.NamedTuple values; Triton >= 3.3 passes
them into kernels and on into @triton.jit helpers, fields read as `t.ptr`, `t.s_b`): one bundle
per tensor (pointer and strides), per layout geometry and per modifier, and constexpr bundles for
the tile configuration and feature switches (tuples of `tl.constexpr` values, see `constexprs`).
How a bundle may be shaped: bundles.py.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

# the kernels take NamedTuple arguments (Triton >= 3.3)
MIN_TRITON = (3, 3)

try:  # triton is optional: without it only the reference backend exists
    import triton
    import triton.language as tl
    _MISSING = ("" if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= MIN_TRITON else
                f"backend='triton' needs triton >= 3.3 (found {triton.__version__}); use backend='reference'")
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _MISSING = "backend='triton' needs the triton package; use backend='reference'"
HAS_TRITON = not _MISSING

__all__ = ["HAS_TRITON", "triton", "tl", "interpreter_enabled", "device_reason", "check_inputs", "bs", "contig",
           "next_pow2", "pow2_at_least_16", "call_reason", "Rows", "rows", "row_base", "load_tile", "store_tile", "constexprs"]


def interpreter_enabled() -> bool:
    """True when Triton kernels may run on CPU tensors (TRITON_INTERPRET=1, tests only)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pow2_at_least_16(x: int) -> int:
    """Padded head dim of a kernel tile (a power of two, at least 16: the smallest tl.dot size)."""
    return max(16, next_pow2(x))


def device_reason(q, k, v) -> str:
    """Why the Triton kernels cannot take these tensors ("" when they can): triton installed, CUDA
    (or the interpreter), fp32/16/bf16, head dims <= 256, 32-bit offsets."""
    if not HAS_TRITON:
        return _MISSING
    if q.device.type != "cuda" and not interpreter_enabled():
        return f"backend='triton' needs CUDA tensors (got {q.device}); use backend='reference' on CPU"
    if q.dtype == torch.float64:
        return "backend='triton' supports float32/float16/bfloat16, not float64"
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > 256:
        return f"backend='triton' supports head dims up to 256, got D={D}, Dv={Dv}"
    B, H, Lq = q.shape[:3]
    if max(q.numel(), k.numel(), v.numel(), B * H * Lq * Dv) >= 2 ** 31:
        return (f"backend='triton' addresses tensors with 32-bit offsets; q {tuple(q.shape)} / v {tuple(v.shape)} "
                "exceed 2^31 elements: split the batch")
    return ""


def call_reason(q, k, v, lowering, what, layout, mods, dropout_p) -> str:
    """Why a Triton implementation cannot run this call ("" when it can): the tensors
    (`device_reason`, the same for every Triton implementation, so the router reports it once),
    then the layout, modifiers and dropout (`layouts.base.unsupported`)."""
    from ..layouts.base import unsupported
    return device_reason(q, k, v) or unsupported(lowering, what, layout, mods, dropout_p)


def check_inputs(q, k, v):
    """Raise the `device_reason` (RuntimeError without triton, else ValueError)."""
    why = device_reason(q, k, v)
    if why:
        raise (RuntimeError if not HAS_TRITON else ValueError)(f"attention: {why}")


def bs(t, dim):
    """Stride of `dim`, 0 where the tensor broadcasts (size 1)."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


def contig(t):
    """t with unit stride in its last dim (the kernels' vector loads need it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class Rows(NamedTuple):
    """A (B, H, L, D) tensor as a kernel addresses it: the pointer and its batch, head and row
    strides (the last dim has unit stride, see `contig`)."""
    ptr: torch.Tensor
    s_b: int
    s_h: int
    s_n: int


def rows(t) -> Rows:
    return Rows(t, t.stride(0), t.stride(1), t.stride(2))


if HAS_TRITON:

    @triton.jit
    def row_base(t, b, h):
        """Pointer to row 0 of batch b, head h of a `Rows` bundle."""
        return t.ptr + b * t.s_b + h * t.s_h

    @triton.jit
    def load_tile(t, b, h, tok, ok, cols, n):
        """Rows `tok` (where `ok`) x columns `cols` (< n) of a `Rows` bundle; 0 elsewhere."""
        return tl.load(row_base(t, b, h) + tok[:, None] * t.s_n + cols[None, :],
                       mask=ok[:, None] & (cols < n)[None, :], other=0.0)

    @triton.jit
    def store_tile(t, b, h, tok, ok, cols, n, val):
        """Store `val` (cast to the tensor's dtype) at rows `tok` (where `ok`) x columns `cols` (< n)."""
        tl.store(row_base(t, b, h) + tok[:, None] * t.s_n + cols[None, :], val.to(t.ptr.dtype.element_ty),
                 mask=ok[:, None] & (cols < n)[None, :])


def constexprs(bundle):
    """A settings bundle (tile shapes, feature switches) as a tuple of `tl.constexpr` values.

    Kernels take such bundles as plain (non-annotated) tuple arguments: every element is then a
    compile-time constant, read as `tile.BM`. Annotating the whole tuple `tl.constexpr` instead
    makes its fields plain ints on triton 3.3-3.6, which `tl.zeros` / `tl.arange` reject."""
    return type(bundle)(*(tl.constexpr(v) for v in bundle))
