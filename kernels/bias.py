"""Typed bias and score-mod arguments of `attention`.

They only hold tensors and validate them; the backends evaluate them on the (query, key) pairs a
layout keeps, so no (Lq, Lk) tensor is built unless the caller passed one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["IndexedBias", "RelPosBias", "GaussianMixture", "TalkingHeads"]


class IndexedBias:
    """logit += table[h, index[b, i, j]]: a small learned table indexed per pair (hop distances)."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() != 2:
            raise ValueError(f"IndexedBias: table must be a float tensor (H, T), got "
                             f"{getattr(table, 'dtype', type(table))} {tuple(getattr(table, 'shape', ()))}")
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                       torch.uint8, torch.int8) \
                or index.dim() != 3:
            raise ValueError(f"IndexedBias: index must be an integer tensor (B|1, Lq, Lk), got "
                             f"{getattr(index, 'dtype', type(index))} {tuple(getattr(index, 'shape', ()))}")
        if index.numel() and not torch.compiler.is_compiling() and (int(index.min()) < 0 or int(index.max()) >= table.shape[1]):
            raise ValueError(f"IndexedBias: index values must be in [0, T={table.shape[1]}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        self.table, self.index = table, index

    def check(self, B, H, Lq, Lk):
        if self.table.shape[0] not in (1, H):
            raise ValueError(f"IndexedBias: table has {self.table.shape[0]} heads, q has {H}")
        if self.index.shape[0] not in (1, B) or tuple(self.index.shape[1:]) != (Lq, Lk):
            raise ValueError(f"IndexedBias: index must be (B|1, Lq, Lk) = ({B}|1, {Lq}, {Lk}), got "
                             f"{tuple(self.index.shape)}")

    def tensors(self):
        return [self.table]


class RelPosBias:
    """Decomposed, query-dependent 2-D relative position logits (HaloNet / BoTNet style).

    logit(i, j) += rel_h[b, h, i, dy + Rh//2] + rel_w[b, h, i, dx + Rw//2], (dy, dx) = key pos − query
    pos; positions are local to the block/window for `window_2d`, else row-major on q_grid/k_grid.
    """

    def __init__(self, rel_h: torch.Tensor, rel_w: torch.Tensor, q_grid: Optional[Tuple[int, int]] = None,
                 k_grid: Optional[Tuple[int, int]] = None):
        for n, t in (("rel_h", rel_h), ("rel_w", rel_w)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
                raise ValueError(f"RelPosBias: {n} must be a float tensor (B, H, Lq, R), got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
            if t.shape[-1] % 2 != 1:
                raise ValueError(f"RelPosBias: {n} last dim must be odd (2·r+1), got {t.shape[-1]}")
        if rel_h.shape[:3] != rel_w.shape[:3]:
            raise ValueError(f"RelPosBias: rel_h {tuple(rel_h.shape)} and rel_w {tuple(rel_w.shape)} "
                             "must agree in (B, H, Lq)")
        self.rel_h, self.rel_w = rel_h, rel_w
        self.q_grid = tuple(q_grid) if q_grid is not None else None
        self.k_grid = tuple(k_grid) if k_grid is not None else self.q_grid

    def check(self, B, H, Lq, Lk, layout=None):
        b, h, lq = self.rel_h.shape[:3]
        if b not in (1, B) or h not in (1, H) or lq != Lq:
            raise ValueError(f"RelPosBias: rel_h/rel_w must be (B|1, H|1, Lq, R) with B={B}, H={H}, "
                             f"Lq={Lq}; got {tuple(self.rel_h.shape)}")
        from .layout import WindowLayout
        if not isinstance(layout, WindowLayout):
            if self.q_grid is None or self.k_grid is None:
                raise ValueError("RelPosBias: q_grid and k_grid (h, w) are required unless the layout "
                                 "is window_2d (which defines local positions)")
            if self.q_grid[0] * self.q_grid[1] != Lq or self.k_grid[0] * self.k_grid[1] != Lk:
                raise ValueError(f"RelPosBias: q_grid {self.q_grid} / k_grid {self.k_grid} do not match "
                                 f"(Lq, Lk) = ({Lq}, {Lk})")

    def tensors(self):
        return [self.rel_h, self.rel_w]


class GaussianMixture:
    """Gaussian-mixture positional score mod on a 2-D grid (see kernels/API.md).

    m(p, q) = Σ_k alpha[h,k]·exp(−|pos_p − pos_q|² / (2·sigma[h,k]²)); "mul": logit·m, "add": logit+m.
    The first `num_prefix_tokens` tokens (cls etc.) are not modulated.
    """

    def __init__(self, alpha: torch.Tensor, sigma: torch.Tensor, grid: Tuple[int, int], *, mode: str = "mul",
                 num_prefix_tokens: int = 0):
        for n, t in (("alpha", alpha), ("sigma", sigma)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise ValueError(f"GaussianMixture: {n} must be a float tensor (H, K), got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if alpha.shape != sigma.shape:
            raise ValueError(f"GaussianMixture: alpha {tuple(alpha.shape)} and sigma {tuple(sigma.shape)} differ")
        if mode not in ("mul", "add"):
            raise ValueError(f"GaussianMixture: mode must be 'mul' or 'add', got {mode!r}")
        if len(tuple(grid)) != 2:
            raise ValueError(f"GaussianMixture: grid must be (h, w), got {grid!r}")
        self.alpha, self.sigma = alpha, sigma
        self.grid = tuple(int(g) for g in grid)
        self.mode, self.num_prefix_tokens = mode, int(num_prefix_tokens)

    def check(self, B, H, Lq, Lk):
        if self.alpha.shape[0] not in (1, H):
            raise ValueError(f"GaussianMixture: alpha has {self.alpha.shape[0]} heads, q has {H}")
        n = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        if Lq != n or Lk != n:
            raise ValueError(f"GaussianMixture: grid {self.grid} + {self.num_prefix_tokens} prefix tokens "
                             f"= {n} tokens, but (Lq, Lk) = ({Lq}, {Lk})")

    def tensors(self):
        return [self.alpha, self.sigma]


class TalkingHeads:
    """Talking-heads mixing across heads (Shazeer et al. 2020; CaiT): see kernels/API.md.

    logits'_g = Σ_h pre[h, g]·logits_h before the mask and softmax; with `post`, the probabilities
    are mixed again, A'_g = Σ_h post[h, g]·A_h, before A'_g @ v_g. Every head's full logits are
    needed at once, so this runs on the reference backend (dense rows, chunked over queries).
    """

    def __init__(self, pre: torch.Tensor, post: Optional[torch.Tensor] = None):
        for n, t in (("pre", pre), ("post", post)):
            if t is None and n == "post":
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 \
                    or t.shape[0] != t.shape[1]:
                raise ValueError(f"TalkingHeads: {n} must be a square float tensor (H, H), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if post is not None and post.shape != pre.shape:
            raise ValueError(f"TalkingHeads: pre {tuple(pre.shape)} and post {tuple(post.shape)} differ")
        self.pre, self.post = pre, post

    def check(self, B, H, Lq, Lk):
        if self.pre.shape[0] != H:
            raise ValueError(f"TalkingHeads: mixing matrices are {tuple(self.pre.shape)} but q has {H} heads")

    def tensors(self):
        return [self.pre] + ([self.post] if self.post is not None else [])
