"""Modifiers of the logits: biases, score mods and head mixing. Each class lowers itself.

A modifier holds tensors, validates them, and evaluates itself for every backend, so no backend
looks at modifier types:

- `tensors()`: its floating tensors (gradients flow to them); `flatten()` / `unflatten()` for the
  torch.library op schema; `with_tensors(ts)`: the same modifier on other tensors (autograd leaves).
- `reference_terms(ctx)`: (add, mul) logit terms on a reference-path chunk; `dense_terms(...)`:
  the same over a full (Lq, key slots) grid (dense oracle, talking heads).
- `flex_score_mod(geo)`: a FlexAttention score_mod; `triton_args(layout, device)`,
  `triton_grad_buffers(...)` and `triton_grads(...)`: the kernel argument bundles it fills, its
  gradient buffers (both by slot, kernels/triton/bundles.py) and its parameter gradients.
- `backend_support(backend)`: (ok, reason).

Under torch.fx symbolic tracing a modifier built from traced tensors (a parameter's proxy) is
rebuilt by the traced module at run time (kernels/tracing.py).

Logits are `scale·q·kᵀ`, then the score mod (×m or +m), then the bias (+b). A plain tensor bias
is wrapped in `DenseBias` by the op. No (Lq, Lk) tensor is built unless the caller passed one.
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F

from .tracing import defer_under_fx, fx_create_arg

__all__ = ["Modifier", "DenseBias", "IndexedBias", "RelPosBias", "GaussianMixture", "TalkingHeads",
           "combine_reference_terms", "combine_dense_terms"]

_REGISTRY: Dict[int, Type["Modifier"]] = {}


def _bad(t):
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def _bs(t, dim):
    """Stride of `dim`, 0 where the tensor broadcasts (size 1)."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


class Modifier:
    """Base class of bias / score-mod / head-mix arguments (see the module docstring)."""

    kind = "base"
    code = 0
    role = "bias"          # "bias" | "score_mod" | "head_mix"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "__init__" in cls.__dict__:          # built from traced values under torch.fx: deferred
            cls.__init__ = defer_under_fx(cls.__dict__["__init__"])
        if cls.__dict__.get("kind", "base") != "base":
            cls.code = zlib.crc32(("mod:" + cls.kind).encode()) & 0x7FFFFFFF
            _REGISTRY[cls.code] = cls

    @staticmethod
    def from_code(code: int) -> Type["Modifier"]:
        return _REGISTRY[code]

    def __fx_create_arg__(self, tracer):
        """torch.fx: a constant attribute of the traced module, or, when built from traced values,
        a node that builds it at run time (kernels/tracing.py)."""
        return fx_create_arg(self, tracer)

    # -- tensors and flattening -------------------------------------------------------------------
    def tensors(self) -> List[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def flatten(self) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[int]]:
        """-> (floating tensors, integer tensors, ints)."""
        return self.tensors(), [], []

    @classmethod
    def unflatten(cls, ft, it, ints) -> "Modifier":  # pragma: no cover - abstract
        raise NotImplementedError

    def with_tensors(self, ft) -> "Modifier":
        _, it, ints = self.flatten()
        return type(self).unflatten(list(ft), it, ints)

    def check(self, B, H, Lq, Lk, layout):  # pragma: no cover - abstract
        raise NotImplementedError

    def backend_support(self, backend: str) -> Tuple[bool, str]:
        return True, ""

    # -- lowerings ----------------------------------------------------------------------------------
    def reference_terms(self, ctx) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        raise NotImplementedError

    def dense_terms(self, layout, Lq, kidx, dtype, device):
        raise NotImplementedError

    def flex_score_mod(self, geo):
        raise NotImplementedError

    def triton_args(self, layout, device) -> dict:
        """The kernel argument bundles this modifier fills, by slot (kernels/triton/bundles.py)."""
        raise NotImplementedError

    def triton_grad_buffers(self, lowered, shape, device) -> dict:
        """Gradient buffers for the dQ kernel, by slot; `lowered` is what `triton_args` returned."""
        return {}

    def triton_grads(self, bufs) -> List[torch.Tensor]:
        return []


class _PairCtx:
    """Broadcast index helpers over a reference chunk: qi (Gc, M), ki (Bk, Hk, Gc, N) natural
    indices (-1 = virtual / pad), gb (Gc,) batch of each group or None."""

    def __init__(self, ctx):
        self.ctx = ctx
        qi, ki, self.gb = ctx["qi"], ctx["ki"], ctx.get("gb")
        self.Gc, self.M = qi.shape
        self.q5 = qi.view(1, 1, self.Gc, self.M, 1)
        self.k5 = ki.unsqueeze(-2)                     # (Bk, Hk, Gc, 1, N)
        self.kvalid = self.k5 >= 0
        self.device = qi.device

    def bidx(self, Bt):
        if self.gb is not None:
            return (self.gb if Bt > 1 else torch.zeros_like(self.gb)).view(1, 1, self.Gc, 1, 1)
        return torch.arange(Bt, device=self.device).view(Bt, 1, 1, 1, 1)

    def hidx(self, Ht):
        return torch.arange(Ht, device=self.device).view(1, Ht, 1, 1, 1)


def combine_reference_terms(mods, ctx):
    """Sum of the additive terms and product of the multiplicative ones of `mods` on a chunk."""
    add = mul = None
    pc = _PairCtx(ctx) if mods else None
    for m in mods:
        a, u = m.reference_terms(pc)
        if u is not None:
            mul = u if mul is None else mul * u
        if a is not None:
            if isinstance(a, tuple):             # separable rows/columns term (window rel-pos)
                if add is None:
                    add = a
                    continue
                a = (a[0][..., :, None] + a[1][..., None, :]).flatten(-2)
            if isinstance(add, tuple):
                add = (add[0][..., :, None] + add[1][..., None, :]).flatten(-2)
            add = a if add is None else add + a
    return add, mul


def combine_dense_terms(mods, layout, Lq, kidx, dtype, device):
    """Full (B|1, H|1, Lq, Nk) additive term and multiplicative mod over key slots `kidx` (natural
    key index, -1 for virtual keys)."""
    add = mul = None
    for m in mods:
        a, u = m.dense_terms(layout, Lq, kidx, dtype, device)
        if u is not None:
            mul = u if mul is None else mul * u
        if a is not None:
            add = a if add is None else add + a
    return add, mul


def _pair_gather(t, bi, hi, qi, ki):
    """t (Bt, Ht, Lq, Lk) -> t[bi, hi, qi, ki]; negative indices read index 0 (callers zero them)."""
    return t[bi, hi, qi.clamp_min(0), ki.clamp_min(0)]


def _rel_to_abs(x, n_out):
    """x (..., W, R) -> (..., W, n_out) with out[i, j] = x[i, j - i + R // 2] (relative -> absolute
    offsets by the pad-and-reshape trick; no gather, cheap backward)."""
    *lead, W, R = x.shape
    flat = F.pad(x, (0, 1)).reshape(*lead, W * (R + 1))
    if W < R // 2:
        flat = F.pad(flat, (0, R // 2 - W))
    return flat[..., R // 2: R // 2 + W * R].reshape(*lead, W, R)[..., :n_out]


# ------------------------------------------------------------------------------------------------
# DenseBias
# ------------------------------------------------------------------------------------------------
class DenseBias(Modifier):
    """logit += bias[b, h, i, j], a tensor broadcastable to (B, H, Lq, Lk) (the op wraps a plain tensor)."""

    kind = "dense"

    def __init__(self, bias: torch.Tensor):
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError(f"attention: a tensor bias must be floating point, got {_bad(bias)}")
        self.bias = bias

    def tensors(self):
        return [self.bias]

    @classmethod
    def unflatten(cls, ft, it, ints):
        obj = cls.__new__(cls)
        obj.bias = ft[0]
        return obj

    def check(self, B, H, Lq, Lk, layout):
        bias = self.bias
        try:
            ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, (B, H, Lq, Lk)) == (B, H, Lq, Lk)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attention: bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"(B, H, Lq, Lk) = {(B, H, Lq, Lk)}")

    def _as4(self, dtype=None):
        t = self.bias if dtype is None else self.bias.to(dtype)
        while t.dim() < 4:
            t = t.unsqueeze(0)
        return t

    def reference_terms(self, pc):
        t = self._as4()
        qi = pc.q5 if t.shape[2] > 1 else torch.zeros_like(pc.q5)        # broadcast dims read index 0
        ki = pc.k5 if t.shape[3] > 1 else torch.zeros_like(pc.k5)
        val = _pair_gather(t, pc.bidx(t.shape[0]), pc.hidx(t.shape[1]), qi, ki)
        return torch.where(pc.kvalid, val, torch.zeros_like(val)), None     # virtual keys read 0

    def dense_terms(self, layout, Lq, kidx, dtype, device):
        t = self._as4()
        jc = kidx.clamp_min(0)
        val = t.expand(*t.shape[:2], Lq, t.shape[3])[:, :, :, jc] if t.shape[3] > 1 else \
            t.expand(*t.shape[:2], Lq, 1).expand(*t.shape[:2], Lq, kidx.numel())
        return torch.where((kidx < 0)[None, None, None], torch.zeros_like(val), val), None

    def flex_score_mod(self, geo):
        bt, nat = self._as4(), geo["nat"]
        bs = bt.shape

        def dense_bias(score, b, h, qi, ki):
            kn = nat(ki)
            val = bt[b if bs[0] > 1 else 0, h if bs[1] > 1 else 0, qi if bs[2] > 1 else 0,
                     kn.clamp(min=0) if bs[3] > 1 else 0]
            return score + torch.where(kn >= 0, val, 0.0)
        return dense_bias

    def triton_args(self, layout, device):
        from .triton.bundles import pair_map
        return dict(bias=pair_map(self._as4()))

    def triton_grad_buffers(self, lowered, shape, device):
        from .triton.bundles import pair_map
        bt = lowered["bias"].ptr
        db = torch.zeros(bt.shape, device=device, dtype=torch.float32)
        atomic = any(bt.shape[i] == 1 and n > 1 for i, n in enumerate(shape))
        return dict(dbias=pair_map(db), features=dict(DB_ATOMIC=atomic))

    def triton_grads(self, bufs):
        return [bufs["dbias"].ptr.to(self.bias.dtype).reshape(self.bias.shape)]


# ------------------------------------------------------------------------------------------------
# IndexedBias
# ------------------------------------------------------------------------------------------------
class IndexedBias(Modifier):
    """logit += table[h, index[b, i, j]]: a small learned table indexed per pair (hop distances)."""

    kind = "indexed"

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() != 2:
            raise ValueError(f"IndexedBias: table must be a float tensor (H, T), got {_bad(table)}")
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                       torch.uint8, torch.int8) \
                or index.dim() != 3:
            raise ValueError(f"IndexedBias: index must be an integer tensor (B|1, Lq, Lk), got {_bad(index)}")
        if index.numel() and not torch.compiler.is_compiling() and (int(index.min()) < 0 or int(index.max()) >= table.shape[1]):
            raise ValueError(f"IndexedBias: index values must be in [0, T={table.shape[1]}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        self.table, self.index = table, index

    def tensors(self):
        return [self.table]

    def flatten(self):
        return [self.table], [self.index], []

    @classmethod
    def unflatten(cls, ft, it, ints):
        obj = cls.__new__(cls)
        obj.table, obj.index = ft[0], it[0]
        return obj

    def check(self, B, H, Lq, Lk, layout):
        if self.table.shape[0] not in (1, H):
            raise ValueError(f"IndexedBias: table has {self.table.shape[0]} heads, q has {H}")
        if self.index.shape[0] not in (1, B) or tuple(self.index.shape[1:]) != (Lq, Lk):
            raise ValueError(f"IndexedBias: index must be (B|1, Lq, Lk) = ({B}|1, {Lq}, {Lk}), got "
                             f"{tuple(self.index.shape)}")

    def reference_terms(self, pc):
        ind = self.index.long().unsqueeze(1)
        idx = _pair_gather(ind, pc.bidx(ind.shape[0]), pc.hidx(1), pc.q5, pc.k5)
        val = self.table[pc.hidx(self.table.shape[0]), idx]
        return torch.where(pc.kvalid, val, torch.zeros_like(val)), None

    def dense_terms(self, layout, Lq, kidx, dtype, device):
        ind = self.index.long()[:, :, kidx.clamp_min(0)]                # (Bi, Lq, Nk)
        val = self.table[:, ind].permute(1, 0, 2, 3)                    # (Bi, H, Lq, Nk)
        return torch.where((kidx < 0)[None, None, None], torch.zeros_like(val), val), None

    def flex_score_mod(self, geo):
        tab, ind, nat = self.table, self.index, geo["nat"]
        ht, bi = tab.shape[0], ind.shape[0]

        def idx_bias(score, b, h, qi, ki):
            kn = nat(ki)
            val = tab[h if ht > 1 else 0, ind[b if bi > 1 else 0, qi, kn.clamp(min=0)]]
            return score + torch.where(kn >= 0, val, 0.0)
        return idx_bias

    def triton_args(self, layout, device):
        from .triton.bundles import HeadRows, PairMap, Table
        tab = self.table.contiguous()
        idx = self.index.to(device=device, dtype=torch.int32).contiguous()
        index = PairMap(idx, s_b=_bs(idx, 0), s_h=0, s_i=idx.stride(1), s_j=idx.stride(2))
        return dict(table=Table(HeadRows(tab, _bs(tab, 0)), index))

    def triton_grad_buffers(self, lowered, shape, device):
        return dict(dtable=torch.zeros(lowered["table"].table.ptr.shape, device=device, dtype=torch.float32))

    def triton_grads(self, bufs):
        return [bufs["dtable"].to(self.table.dtype)]


# ------------------------------------------------------------------------------------------------
# RelPosBias
# ------------------------------------------------------------------------------------------------
class RelPosBias(Modifier):
    """Decomposed, query-dependent 2-D relative position logits (HaloNet / BoTNet style).

    logit(i, j) += rel_h[b, h, i, dy + Rh//2] + rel_w[b, h, i, dx + Rw//2], (dy, dx) = key pos − query
    pos; positions are local to the block/window for layouts with local positions (`window_2d`),
    else row-major on q_grid/k_grid. On window positions it also applies to virtual border keys.
    """

    kind = "relpos"

    def __init__(self, rel_h: torch.Tensor, rel_w: torch.Tensor, q_grid: Optional[Tuple[int, int]] = None,
                 k_grid: Optional[Tuple[int, int]] = None):
        for n, t in (("rel_h", rel_h), ("rel_w", rel_w)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
                raise ValueError(f"RelPosBias: {n} must be a float tensor (B, H, Lq, R), got {_bad(t)}")
            if t.shape[-1] % 2 != 1:
                raise ValueError(f"RelPosBias: {n} last dim must be odd (2·r+1), got {t.shape[-1]}")
        if rel_h.shape[:3] != rel_w.shape[:3]:
            raise ValueError(f"RelPosBias: rel_h {tuple(rel_h.shape)} and rel_w {tuple(rel_w.shape)} "
                             "must agree in (B, H, Lq)")
        self.rel_h, self.rel_w = rel_h, rel_w
        self.q_grid = tuple(q_grid) if q_grid is not None else None
        self.k_grid = tuple(k_grid) if k_grid is not None else self.q_grid

    def tensors(self):
        return [self.rel_h, self.rel_w]

    def flatten(self):
        grid = [1, *self.q_grid, *self.k_grid] if self.q_grid is not None else [0]
        return [self.rel_h, self.rel_w], [], grid

    @classmethod
    def unflatten(cls, ft, it, ints):
        obj = cls.__new__(cls)
        obj.rel_h, obj.rel_w = ft[0], ft[1]
        obj.q_grid = tuple(ints[1:3]) if ints[0] else None
        obj.k_grid = tuple(ints[3:5]) if ints[0] else None
        return obj

    def check(self, B, H, Lq, Lk, layout=None):
        b, h, lq = self.rel_h.shape[:3]
        if b not in (1, B) or h not in (1, H) or lq != Lq:
            raise ValueError(f"RelPosBias: rel_h/rel_w must be (B|1, H|1, Lq, R) with B={B}, H={H}, "
                             f"Lq={Lq}; got {tuple(self.rel_h.shape)}")
        if getattr(layout, "local_positions", False):
            for n, t, need in (("rel_h", self.rel_h, layout.win_h), ("rel_w", self.rel_w, layout.win_w)):
                if t.shape[-1] // 2 < need - 1:
                    raise ValueError(f"RelPosBias: {n} has R={t.shape[-1]} but the window needs offsets up to "
                                     f"±{need - 1} (R >= {2 * need - 1})")
            return
        if self.q_grid is None or self.k_grid is None:
            raise ValueError("RelPosBias: q_grid and k_grid (h, w) are required unless the layout "
                             "is window_2d (which defines local positions)")
        if self.q_grid[0] * self.q_grid[1] != Lq or self.k_grid[0] * self.k_grid[1] != Lk:
            raise ValueError(f"RelPosBias: q_grid {self.q_grid} / k_grid {self.k_grid} do not match "
                             f"(Lq, Lk) = ({Lq}, {Lk})")
        for n, t, a, b_ in (("rel_h", self.rel_h, self.q_grid[0], self.k_grid[0]),
                            ("rel_w", self.rel_w, self.q_grid[1], self.k_grid[1])):
            if t.shape[-1] // 2 < max(a, b_) - 1:
                raise ValueError(f"RelPosBias: {n} has R={t.shape[-1]} but grids {self.q_grid}/{self.k_grid} "
                                 f"need R >= {2 * max(a, b_) - 1}")

    def reference_terms(self, pc):
        rh, rw = self.rel_h, self.rel_w
        Rh, Rw = rh.shape[-1], rw.shape[-1]
        local = pc.ctx.get("local_relpos")
        if local is not None:           # the layout's plan knows its window geometry
            return local(rh, rw), None
        qw, kw = self.q_grid[1], self.k_grid[1]
        qc, kc = pc.q5.clamp_min(0), pc.k5.clamp_min(0)
        iy = torch.div(kc, kw, rounding_mode="floor") - torch.div(qc, qw, rounding_mode="floor") + Rh // 2
        ix = kc.remainder(kw) - qc.remainder(qw) + Rw // 2
        bh, hh = pc.bidx(rh.shape[0]), pc.hidx(rh.shape[1])
        val = rh[bh, hh, qc, iy] + rw[bh, hh, qc, ix]
        return torch.where(pc.kvalid, val, torch.zeros_like(val)), None

    def dense_terms(self, layout, Lq, kidx, dtype, device):
        rh, rw = self.rel_h, self.rel_w
        Rh, Rw = rh.shape[-1], rw.shape[-1]
        i = torch.arange(Lq, device=device)[:, None]
        if getattr(layout, "local_positions", False):
            dy, dx = layout.local_offsets(kidx, device)                   # (Lq, Nk)
            virt = None
        else:
            jc = kidx.clamp_min(0)[None, :]
            qw, kw = self.q_grid[1], self.k_grid[1]
            dy, dx = jc // kw - i // qw, jc % kw - i % qw
            virt = kidx < 0
        iy = (dy + Rh // 2).clamp(0, Rh - 1)
        ix = (dx + Rw // 2).clamp(0, Rw - 1)
        ar = torch.arange(rh.shape[2], device=device)[:, None]
        val = rh[:, :, ar, iy.expand(Lq, -1)] + rw[:, :, ar, ix.expand(Lq, -1)]
        if virt is not None:
            val = torch.where(virt[None, None, None], torch.zeros_like(val), val)
        return val, None

    def flex_score_mod(self, geo):
        rh, rw = self.rel_h, self.rel_w
        Rh, Rw = rh.shape[-1], rw.shape[-1]
        rb, rhh = rh.shape[0], rh.shape[1]
        local = geo.get("local")
        if local is None:
            qw, kw = self.q_grid[1], self.k_grid[1]
            local = lambda qi, ki: (ki // kw - qi // qw, ki % kw - qi % qw)  # noqa: E731

        def rel(score, b, h, qi, ki):
            dy, dx = local(qi, ki)
            iy = (dy + Rh // 2).clamp(0, Rh - 1)
            ix = (dx + Rw // 2).clamp(0, Rw - 1)
            bb, hh = (b if rb > 1 else 0), (h if rhh > 1 else 0)
            return score + rh[bb, hh, qi, iy] + rw[bb, hh, qi, ix]
        return rel

    def triton_args(self, layout, device):
        from .triton.bundles import RelGrid, RelPos, Rows
        rh, rw = self.rel_h.contiguous(), self.rel_w.contiguous()
        local = bool(getattr(layout, "local_positions", False))
        grid = RelGrid(rh.shape[-1], rw.shape[-1])
        if not local:
            grid = grid._replace(qgw=self.q_grid[1], kgw=self.k_grid[1])
        rows = [Rows(t, _bs(t, 0), _bs(t, 1), t.stride(2)) for t in (rh, rw)]
        return dict(relpos=RelPos(*rows, grid), features=dict(RP_WIN=local))

    def triton_grad_buffers(self, lowered, shape, device):
        rp = lowered["relpos"]
        return dict(drh=torch.zeros(rp.rh.ptr.shape, device=device, dtype=torch.float32),
                    drw=torch.zeros(rp.rw.ptr.shape, device=device, dtype=torch.float32))

    def triton_grads(self, bufs):
        return [bufs["drh"].to(self.rel_h.dtype), bufs["drw"].to(self.rel_w.dtype)]


# ------------------------------------------------------------------------------------------------
# GaussianMixture (score mod)
# ------------------------------------------------------------------------------------------------
class GaussianMixture(Modifier):
    """Gaussian-mixture positional score mod on a 2-D grid (see kernels/API.md).

    m(p, q) = Σ_k alpha[h,k]·exp(−|pos_p − pos_q|² / (2·sigma[h,k]²)); "mul": logit·m, "add": logit+m.
    The first `num_prefix_tokens` tokens (cls etc.) and virtual keys are not modulated.
    """

    kind = "gmm"
    role = "score_mod"

    def __init__(self, alpha: torch.Tensor, sigma: torch.Tensor, grid: Tuple[int, int], *, mode: str = "mul",
                 num_prefix_tokens: int = 0):
        for n, t in (("alpha", alpha), ("sigma", sigma)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise ValueError(f"GaussianMixture: {n} must be a float tensor (H, K), got {_bad(t)}")
        if alpha.shape != sigma.shape:
            raise ValueError(f"GaussianMixture: alpha {tuple(alpha.shape)} and sigma {tuple(sigma.shape)} differ")
        if mode not in ("mul", "add"):
            raise ValueError(f"GaussianMixture: mode must be 'mul' or 'add', got {mode!r}")
        if len(tuple(grid)) != 2:
            raise ValueError(f"GaussianMixture: grid must be (h, w), got {grid!r}")
        self.alpha, self.sigma = alpha, sigma
        self.grid = tuple(int(g) for g in grid)
        self.mode, self.num_prefix_tokens = mode, int(num_prefix_tokens)

    def tensors(self):
        return [self.alpha, self.sigma]

    def flatten(self):
        return [self.alpha, self.sigma], [], [int(self.mode == "add"), self.num_prefix_tokens, *self.grid]

    @classmethod
    def unflatten(cls, ft, it, ints):
        obj = cls.__new__(cls)
        obj.alpha, obj.sigma = ft[0], ft[1]
        obj.mode, obj.num_prefix_tokens, obj.grid = ("add" if ints[0] else "mul"), ints[1], tuple(ints[2:4])
        return obj

    def check(self, B, H, Lq, Lk, layout):
        if self.alpha.shape[0] not in (1, H):
            raise ValueError(f"GaussianMixture: alpha has {self.alpha.shape[0]} heads, q has {H}")
        n = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        if Lq != n or Lk != n:
            raise ValueError(f"GaussianMixture: grid {self.grid} + {self.num_prefix_tokens} prefix tokens "
                             f"= {n} tokens, but (Lq, Lk) = ({Lq}, {Lk})")

    def _apply(self, m, modulated):
        if self.mode == "mul":
            return None, torch.where(modulated, m, torch.ones_like(m))
        return torch.where(modulated, m, torch.zeros_like(m)), None

    def reference_terms(self, pc):
        P, gw = self.num_prefix_tokens, self.grid[1]
        qp, kp = pc.q5 - P, pc.k5 - P
        dy = torch.div(qp, gw, rounding_mode="floor") - torch.div(kp, gw, rounding_mode="floor")
        dx = qp.remainder(gw) - kp.remainder(gw)
        d2 = (dy * dy + dx * dx).to(self.alpha.dtype)          # (Bk, Hk, Gc, M, N)
        modulated = (qp >= 0) & (kp >= 0) & pc.kvalid
        Ha, K = self.alpha.shape
        m = 0
        for c in range(K):
            a = self.alpha[:, c].view(1, Ha, 1, 1, 1)
            s2 = (2 * self.sigma[:, c] ** 2).view(1, Ha, 1, 1, 1)
            m = m + a * torch.exp(-d2 / s2)
        return self._apply(m, modulated)

    def dense_terms(self, layout, Lq, kidx, dtype, device):
        P, gw = self.num_prefix_tokens, self.grid[1]
        i = torch.arange(Lq, device=device)[:, None]
        j = kidx[None, :]
        jc = j.clamp_min(0)
        qy, qx = (i - P) // gw, (i - P) % gw
        ky, kx = (jc - P) // gw, (jc - P) % gw
        d2 = ((qy - ky) ** 2 + (qx - kx) ** 2).to(dtype)
        m = (self.alpha[:, :, None, None] * torch.exp(-d2 / (2 * self.sigma[:, :, None, None] ** 2))).sum(1)
        add, mul = self._apply(m, (i >= P) & (jc >= P) & (j >= 0))
        return (add[None] if add is not None else None), (mul[None] if mul is not None else None)

    def flex_score_mod(self, geo):
        P, gwid, nat = self.num_prefix_tokens, self.grid[1], geo["nat"]
        al, sg, mode = self.alpha, self.sigma, self.mode
        ha = al.shape[0]

        def gmm(score, b, h, qi, ki):
            kn = nat(ki)
            qp, kp = qi - P, kn - P
            d2 = ((qp // gwid - kp // gwid) ** 2 + (qp % gwid - kp % gwid) ** 2).to(torch.float32)
            hh = h if ha > 1 else 0
            m = 0.0
            for c in range(al.shape[1]):
                m = m + al[hh, c] * torch.exp(-d2 / (2 * sg[hh, c] ** 2))
            mod = (qp >= 0) & (kp >= 0)
            if mode == "mul":
                return score * torch.where(mod, m, 1.0)
            return score + torch.where(mod, m, 0.0)
        return gmm

    def triton_args(self, layout, device):
        al, sg = self.alpha.contiguous(), self.sigma.contiguous()
        NK = al.shape[1]
        kp = 1 << max(0, NK - 1).bit_length()
        from .triton.bundles import Gmm
        return dict(gmm=Gmm(al, sg, 1 if al.shape[0] > 1 else 0, self.num_prefix_tokens, self.grid[1]),
                    features=dict(NK=NK, KP=max(2, kp), GADD=self.mode == "add"))

    def triton_grad_buffers(self, lowered, shape, device):
        g = lowered["gmm"]
        return dict(dalpha=torch.zeros(g.alpha.shape, device=device, dtype=torch.float32),
                    dsigma=torch.zeros(g.sigma.shape, device=device, dtype=torch.float32))

    def triton_grads(self, bufs):
        return [bufs["dalpha"].to(self.alpha.dtype), bufs["dsigma"].to(self.sigma.dtype)]


# ------------------------------------------------------------------------------------------------
# TalkingHeads (head mixing)
# ------------------------------------------------------------------------------------------------
_NEG_INF = float("-inf")


class TalkingHeads(Modifier):
    """Talking-heads mixing across heads (Shazeer et al. 2020; CaiT): see kernels/API.md.

    logits'_g = Σ_h pre[h, g]·logits_h before the mask and softmax; with `post`, the probabilities
    are mixed again, A'_g = Σ_h post[h, g]·A_h, before A'_g @ v_g. Every head's full logits are
    needed at once, so only the reference backend runs it: `reference_attention` below computes
    dense rows, chunked over queries (at most `chunk_elements` logits at a time).
    """

    kind = "talking_heads"
    role = "head_mix"

    def __init__(self, pre: torch.Tensor, post: Optional[torch.Tensor] = None):
        for n, t in (("pre", pre), ("post", post)):
            if t is None and n == "post":
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 \
                    or t.shape[0] != t.shape[1]:
                raise ValueError(f"TalkingHeads: {n} must be a square float tensor (H, H), got {_bad(t)}")
        if post is not None and post.shape != pre.shape:
            raise ValueError(f"TalkingHeads: pre {tuple(pre.shape)} and post {tuple(post.shape)} differ")
        self.pre, self.post = pre, post

    def tensors(self):
        return [self.pre] + ([self.post] if self.post is not None else [])

    @classmethod
    def unflatten(cls, ft, it, ints):
        obj = cls.__new__(cls)
        obj.pre, obj.post = ft[0], (ft[1] if len(ft) > 1 else None)
        return obj

    def check(self, B, H, Lq, Lk, layout):
        if self.pre.shape[0] != H:
            raise ValueError(f"TalkingHeads: mixing matrices are {tuple(self.pre.shape)} but q has {H} heads")
        if layout is not None and not getattr(layout, "dense_mask_exact", True):
            raise ValueError(f"attention: head_mix works with dense, causal, from_dense_mask, key_lists and other "
                             f"layouts given exactly by their dense mask, got {layout!r} (it has virtual keys)")

    def backend_support(self, backend):
        if backend == "reference":
            return True, ""
        return False, ("head_mix (TalkingHeads) runs on the reference backend only: it needs every head's "
                       "logits at once")

    def reference_attention(self, q, k, v, layout, scale, mods, return_lse, dropout, chunk_elements):
        """Dense rows with logits mixed across heads before the softmax (and probabilities after it)."""
        B, H, Lq, _ = q.shape
        Lk, dev = k.shape[2], q.device
        mask = layout.to_dense_mask() if layout is not None else None
        kidx = torch.arange(Lk, device=dev)
        mods = [m.with_tensors([t.to(q.dtype) for t in m.tensors()]) for m in mods]
        pre = self.pre.to(q.dtype)
        post = self.post.to(q.dtype) if self.post is not None else None
        add, mul = combine_dense_terms(mods, layout, Lq, kidx, q.dtype, dev)     # (.., Lq, Lk)
        rows = max(1, chunk_elements // max(1, B * H * Lk))
        outs, lses = [], []
        for r0 in range(0, Lq, rows):
            r1 = min(Lq, r0 + rows)
            s = torch.matmul(q[:, :, r0:r1], k.transpose(-1, -2)) * scale
            if mul is not None:
                s = s * mul[..., r0:r1, :]
            if add is not None:
                s = s + add[..., r0:r1, :]
            s = torch.einsum("bhij,hg->bgij", s, pre)
            if mask is not None:
                s = s.masked_fill(~mask[:, :, r0:r1], _NEG_INF)
            m = s.detach().amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(s - m)
            lsum = p.sum(-1, keepdim=True)
            p = p / torch.where(lsum > 0, lsum, torch.ones_like(lsum))
            if post is not None:
                p = torch.einsum("bhij,hg->bgij", p, post)
            if dropout is not None:          # seeded per row chunk (reference/core.py: Dropout)
                p = dropout(p, r0)
            outs.append(torch.matmul(p, v))
            lses.append((m + torch.log(lsum)).squeeze(-1))
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        lse = (torch.cat(lses, 2) if len(lses) > 1 else lses[0]) if return_lse else None
        return out, lse
