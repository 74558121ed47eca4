"""The `Layout` base class: which keys each query may attend, and how a layout lowers itself.

A layout keeps the *structure* of its pattern (windows, regions, segments, a band, a mask) and
answers every backend's question about it, so no backend looks at layout types:

- `to_dense_mask()`: bool `(B|1, H|1, Lq, Lk)`, the test oracle.
- `flatten()` / `unflatten(tensors, ints)`: the layout as tensors and ints for the torch.library
  op schema (kernels/custom_op.py), rebuilt without re-validation.
- `block_lut(Lq, Lk, device, block_m, block_n, tile_cap)`: the FlexAttention-format block LUT the
  Triton kernels walk (kernels/lut.py has the format and helpers), and `triton_args(device)`, the
  kernel argument bundles of its window geometry and element predicates (for partial tiles) and
  its extra switches, by slot (kernels/triton/bundles.py).
- `reference_plan(B, H, device)`: how the PyTorch path splits queries into groups with gathered
  keys (kernels/reference/core.py), optionally a `reference_shortcut` (a faster exact path).
- `flex_lowering(q, k, v)`: the FlexAttention `mask_mod` (and key-slot mapping).
- `fallback()`: an equivalent layout that more backends can run (key lists -> their element mask),
  used by the router when a backend cannot take the layout itself.

A backend can run a layout iff the layout overrides that backend's lowering (`lowers_to`).
Builders skip their data-dependent range checks while `torch.compile` traces them. Under torch.fx
symbolic tracing a layout built from traced values is rebuilt by the traced module at run time
(kernels/tracing.py).
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Tuple, Type

import torch

from ..tracing import defer_under_fx, fx_create_arg

__all__ = ["Layout", "check_bool", "new_unchecked", "layout_class", "triton_kv_valid", "unsupported"]

_REGISTRY: Dict[int, Type["Layout"]] = {}

# lowering method each backend needs
_LOWERINGS = {"reference": "reference_plan", "triton": "triton_args", "flex": "flex_lowering",
              "key_lists": "key_list_args"}


def check_bool(name, t, ndim):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != ndim:
        raise ValueError(f"{name} must be a bool tensor with {ndim} dims, got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")


def new_unchecked(cls, **attrs):
    """An instance of `cls` with the given attributes, skipping `__init__` (already validated)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


def layout_class(code: int) -> Type["Layout"]:
    return _REGISTRY[code]


class Layout:
    """Base class. Subclasses set q_len, kv_len, batch (None = any batch) and heads (None = any)."""

    kind = "base"
    code = 0
    q_len: int
    kv_len: int
    batch: Optional[int] = None
    heads: Optional[int] = None
    # True when some query row may end up with no admissible key (needs the NaN-safe softmax).
    may_have_empty_rows: bool = True
    # True when the layout defines local (block / window) positions for RelPosBias
    local_positions: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "__init__" in cls.__dict__:          # built from traced values under torch.fx: deferred
            cls.__init__ = defer_under_fx(cls.__dict__["__init__"])
        if cls.__dict__.get("kind", "base") != "base":
            cls.code = zlib.crc32(cls.kind.encode()) & 0x7FFFFFFF
            other = _REGISTRY.get(cls.code)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"layout kind {cls.kind!r} of {cls.__name__} collides with {other.__name__}")
            _REGISTRY[cls.code] = cls

    def __fx_create_arg__(self, tracer):
        """torch.fx: a constant attribute of the traced module, or, when built from traced values,
        a node that builds it at run time (kernels/tracing.py)."""
        return fx_create_arg(self, tracer)

    # -- validation and oracle ------------------------------------------------------------------
    def check(self, B: int, H: int, Lq: int, Lk: int):
        if (Lq, Lk) != (self.q_len, self.kv_len):
            raise ValueError(f"{type(self).__name__} was built for (Lq, Lk) = ({self.q_len}, "
                             f"{self.kv_len}) but q/k have (Lq, Lk) = ({Lq}, {Lk})")
        if self.batch is not None and self.batch not in (1, B):
            raise ValueError(f"{type(self).__name__} was built for batch {self.batch} but q has "
                             f"batch {B}")
        if self.heads is not None and self.heads not in (1, H):
            raise ValueError(f"{type(self).__name__} was built for {self.heads} heads but q has {H}")

    def to_dense_mask(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def oracle_keys(self, k, v):
        """(k, v, key slot -> natural key index (-1: virtual key), bool mask over the slots) for the
        dense oracle. Layouts with virtual keys (zero-border windows) extend k and v."""
        return k, v, torch.arange(k.shape[2], device=k.device), self.to_dense_mask()

    @property
    def device(self):
        for v in vars(self).values():
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")

    def __repr__(self):
        return f"{type(self).__name__}(q_len={self.q_len}, kv_len={self.kv_len})"

    # -- lowering protocol ----------------------------------------------------------------------
    def lowers_to(self, backend: str) -> bool:
        """True if this layout has its own lowering for `backend` ("reference", "triton", "flex",
        "key_lists")."""
        name = _LOWERINGS[backend]
        return getattr(type(self), name) is not getattr(Layout, name)

    def fallback(self) -> Optional["Layout"]:
        """An equivalent layout for backends this one does not lower to (None: there is none)."""
        return None

    def flatten(self) -> Tuple[List[torch.Tensor], List[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def unflatten(cls, tensors: List[torch.Tensor], ints: List[int]) -> "Layout":  # pragma: no cover
        raise NotImplementedError

    def block_lut(self, Lq, Lk, device, block_m, block_n, tile_cap):
        raise NotImplementedError(f"{type(self).__name__} has no block LUT")

    # linear tiles (token spans) rather than 2-D window tiles: heavy variants narrow their key tiles
    linear_tiles = True

    def triton_args(self, device) -> dict:
        """The kernel argument bundles this layout fills, by slot (kernels/triton/bundles.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no Triton lowering")

    def reference_plan(self, B, H, device):
        raise NotImplementedError(f"{type(self).__name__} has no reference plan")

    def reference_shortcut(self, q, k, v, scale, mods, return_lse, dropout_p):
        """An exact faster path for this call, or None."""
        return None

    def key_list_args(self):
        """(index, kv_len, dense_rows, has_pad) for the key-list backends."""
        raise NotImplementedError(f"{type(self).__name__} is not given as key lists")

    # the dense mask is the whole pattern (False for layouts with virtual keys)
    dense_mask_exact = True
    # partial tiles evaluate an expensive predicate (mask bits): Triton narrows its tiles
    heavy_predicate = False

    def flex_lowering(self, q, k, v):
        """-> dict(k=, v=, mask_mod=, nat=key slot -> natural index (tensor fn), local=None or
        fn(qi, ki) -> (dy, dx) local offsets)."""
        raise NotImplementedError(f"{type(self).__name__} has no FlexAttention lowering")


def triton_kv_valid(kv_valid, dev) -> dict:
    """The `kv_valid` slot of a (B|1, Lk) key-validity mask (empty when there is none)."""
    if kv_valid is None:
        return {}
    from ..triton.bundles import KeyValid
    kvv = kv_valid.to(device=dev, dtype=torch.int8).contiguous()
    return dict(kv_valid=KeyValid(kvv, kvv.stride(0) if kvv.shape[0] > 1 else 0))


def unsupported(backend: str, what: str, layout, mods, dropout_p: float, dropout: bool = False) -> str:
    """Why `what` (a backend implementation) cannot run this call ("" when it can): the layout must
    lower to `backend` ("key_lists": be given as key lists), each modifier must accept it, and
    dropout needs `dropout=True`. Key-list implementations run plain attention only."""
    if backend == "key_lists":
        if layout is None or not layout.lowers_to("key_lists"):
            return "the layout is not given as key lists"
        if mods:
            return f"{what} runs plain attention only (no bias, score_mod or head_mix)"
    elif layout is not None and not layout.lowers_to(backend):
        return f"{what} has no lowering for {type(layout).__name__}"
    for m in mods:
        ok, why = m.backend_support(backend)
        if not ok:
            return why
    if dropout_p > 0 and not dropout:
        return f"{what} has no attention dropout (the router sends dropout_p > 0 to the reference backend)"
    return ""
