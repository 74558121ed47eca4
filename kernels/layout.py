"""Attention layouts: which keys each query may attend.

A layout is a small object that keeps the *structure* of the pattern (halo windows, routed regions,
segments, causal band, dense mask). The reference path uses that structure directly (gathers per
query group, never an Lq x Lk matrix); the Triton path asks it for a FlexAttention-style block LUT
(`block_lut`). Every layout has `.q_len`, `.kv_len` and `.to_dense_mask()`, the test oracle.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "Layout", "WindowLayout", "RoutedLayout", "SegmentLayout", "CausalLayout", "MaskLayout", "KeyListLayout",
    "window_2d", "routed_topk", "segments", "varlen", "causal", "from_dense_mask", "key_lists",
]


def _check_bool(name, t, ndim):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != ndim:
        raise ValueError(f"{name} must be a bool tensor with {ndim} dims, got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")


class Layout:
    """Base class. Subclasses set q_len, kv_len, batch (None = any batch) and heads (None = any)."""

    kind = "base"
    q_len: int
    kv_len: int
    batch: Optional[int] = None
    heads: Optional[int] = None
    # True when some query row may end up with no admissible key (needs the NaN-safe softmax).
    may_have_empty_rows: bool = True

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

    @property
    def device(self):
        for v in vars(self).values():
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")

    def __repr__(self):
        return f"{type(self).__name__}(q_len={self.q_len}, kv_len={self.kv_len})"


# ----------------------------------------------------------------------------------------------
# window_2d
# ----------------------------------------------------------------------------------------------
class WindowLayout(Layout):
    """Blocked local (halo) attention on an h x w map, tokens row-major."""

    kind = "window"

    def __init__(self, h, w, block, halo, border="zero", stride=1, kv_valid=None):
        for n, v in (("h", h), ("w", w), ("block", block), ("stride", stride)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"window_2d: {n} must be a positive int, got {v!r}")
        if not isinstance(halo, int) or halo < 0:
            raise ValueError(f"window_2d: halo must be an int >= 0, got {halo!r}")
        if h % block or w % block:
            raise ValueError(f"window_2d: h and w must be multiples of block={block}, got "
                             f"h={h}, w={w} (pad the map and mask the padding via kv_valid)")
        if block % stride:
            raise ValueError(f"window_2d: block={block} must be a multiple of stride={stride}")
        if border not in ("zero", "clamp"):
            raise ValueError(f"window_2d: border must be 'zero' or 'clamp', got {border!r}")
        self.h, self.w, self.block, self.halo, self.border, self.stride = h, w, block, halo, border, stride
        self.win = block + 2 * halo
        self.bq = block // stride           # query block side
        self.nby, self.nbx = h // block, w // block
        self.q_len = (h // stride) * (w // stride)
        self.kv_len = h * w
        if kv_valid is not None:
            _check_bool("window_2d kv_valid", kv_valid, 2)
            if kv_valid.shape[1] != h * w:
                raise ValueError(f"window_2d: kv_valid must be (B, h*w={h * w}), got {tuple(kv_valid.shape)}")
            self.batch = kv_valid.shape[0]
        self.kv_valid = kv_valid
        self.may_have_empty_rows = kv_valid is not None and self._some_window_empty(kv_valid)
        # window extent per axis: start (map coords, may be < 0 for zero border) and size
        if border == "zero":
            self.win_h = self.win_w = self.win
        else:
            self.win_h, self.win_w = min(self.win, h), min(self.win, w)

    def _some_window_empty(self, kv_valid) -> bool:
        """True if some block's window has no admissible key (so the NaN-safe softmax is needed).
        Zero border: windows touching the map edge keep their virtual keys and are never empty.
        Clamp: assumed possible (shifted windows are not checked)."""
        if self.border != "zero":
            return True
        valid = kv_valid.view(-1, 1, self.h, self.w).float()
        any_valid = F.max_pool2d(valid, self.win, self.block, self.halo) > 0      # (Bv, 1, nby, nbx)
        empty = ~any_valid[:, 0]
        if self.halo > 0:
            empty[:, 0, :] = empty[:, -1, :] = False
            empty[:, :, 0] = empty[:, :, -1] = False
        return bool(empty.any())

    def starts(self, device=None):
        """Window start (map coords) for each block row / block column."""
        by = torch.arange(self.nby, device=device) * self.block - self.halo
        bx = torch.arange(self.nbx, device=device) * self.block - self.halo
        if self.border == "clamp":
            by = by.clamp(0, max(self.h - self.win_h, 0))
            bx = bx.clamp(0, max(self.w - self.win_w, 0))
        return by, bx

    def q_index(self, device=None):
        """(G, bq*bq) natural query index of each query block, blocks row-major."""
        bq, wq = self.bq, self.w // self.stride
        r = torch.arange(bq, device=device)
        by = torch.arange(self.nby, device=device)
        bx = torch.arange(self.nbx, device=device)
        y = by[:, None, None, None] * bq + r[None, None, :, None]
        x = bx[None, :, None, None] * bq + r[None, None, None, :]
        return (y * wq + x).reshape(self.nby * self.nbx, bq * bq)

    def k_index(self, device=None):
        """(G, win_h*win_w) natural key index of each window position, -1 for virtual keys."""
        sy, sx = self.starts(device)
        ky = sy[:, None] + torch.arange(self.win_h, device=device)   # (nby, wh)
        kx = sx[:, None] + torch.arange(self.win_w, device=device)   # (nbx, ww)
        iny = (ky >= 0) & (ky < self.h)
        inx = (kx >= 0) & (kx < self.w)
        idx = ky[:, None, :, None] * self.w + kx[None, :, None, :]
        inside = iny[:, None, :, None] & inx[None, :, None, :]
        idx = torch.where(inside, idx, torch.full_like(idx, -1))
        return idx.reshape(self.nby * self.nbx, self.win_h * self.win_w)

    def to_dense_mask(self, include_virtual: bool = False) -> torch.Tensor:
        """Bool (B|1, 1, Lq, Lk) over in-map keys. With include_virtual=True the key axis is the
        zero-padded map ((h+2·halo)·(w+2·halo), row-major) so virtual border keys appear too
        (zero border only)."""
        dev = self.device
        qi = self.q_index(dev)             # (G, M)
        ki = self.k_index(dev)             # (G, N)
        G, M = qi.shape
        if include_virtual:
            if self.border != "zero":
                raise ValueError("include_virtual=True only applies to border='zero'")
            hp, wp = self.h + 2 * self.halo, self.w + 2 * self.halo
            by = torch.arange(self.nby, device=dev) * self.block
            bx = torch.arange(self.nbx, device=dev) * self.block
            ky = by[:, None] + torch.arange(self.win, device=dev)
            kx = bx[:, None] + torch.arange(self.win, device=dev)
            kp = (ky[:, None, :, None] * wp + kx[None, :, None, :]).reshape(G, -1)
            mask = torch.zeros(self.q_len, hp * wp, dtype=torch.bool, device=dev)
            mask[qi[:, :, None].expand(G, M, kp.shape[1]), kp[:, None, :].expand(G, M, kp.shape[1])] = True
            mask = mask[None, None]
            if self.kv_valid is not None:
                valid = torch.nn.functional.pad(self.kv_valid.view(-1, self.h, self.w),
                                                (self.halo,) * 4, value=True).reshape(-1, 1, 1, hp * wp)
                mask = mask & valid
            return mask
        mask = torch.zeros(self.q_len, self.kv_len + 1, dtype=torch.bool, device=dev)
        kk = torch.where(ki < 0, torch.full_like(ki, self.kv_len), ki)
        mask[qi[:, :, None].expand(G, M, kk.shape[1]), kk[:, None, :].expand(G, M, kk.shape[1])] = True
        mask = mask[:, : self.kv_len][None, None]
        if self.kv_valid is not None:
            mask = mask & self.kv_valid[:, None, None, :]
        return mask

    def __repr__(self):
        return (f"WindowLayout(h={self.h}, w={self.w}, block={self.block}, halo={self.halo}, "
                f"border={self.border!r}, stride={self.stride}, kv_valid={self.kv_valid is not None})")


def window_2d(h: int, w: int, block: int, halo: int, *, border: str = "zero", stride: int = 1,
              kv_valid: Optional[torch.Tensor] = None) -> WindowLayout:
    """HaloNet-style blocked local attention (see kernels/API.md)."""
    return WindowLayout(h, w, block, halo, border=border, stride=stride, kv_valid=kv_valid)


# ----------------------------------------------------------------------------------------------
# routed_topk
# ----------------------------------------------------------------------------------------------
class RoutedLayout(Layout):
    """BiFormer bi-level routing: tokens region-major, each query region attends k key regions."""

    kind = "routed"

    def __init__(self, topk_index, region_size, kv_valid=None):
        if not isinstance(topk_index, torch.Tensor) or topk_index.dtype not in (torch.int64, torch.int32) \
                or topk_index.dim() not in (3, 4):
            raise ValueError("routed_topk: topk_index must be an int64/int32 tensor (B, nR, k) or "
                             f"(B, H, nR, k), got {getattr(topk_index, 'dtype', type(topk_index))} "
                             f"{tuple(getattr(topk_index, 'shape', ()))}")
        if not isinstance(region_size, int) or region_size < 1:
            raise ValueError(f"routed_topk: region_size must be a positive int, got {region_size!r}")
        idx = topk_index.long()
        if idx.dim() == 3:
            idx = idx[:, None]
        B, Hk, nR, k = idx.shape
        if idx.numel() and not torch.compiler.is_compiling() and (int(idx.min()) < 0 or int(idx.max()) >= nR):
            raise ValueError(f"routed_topk: topk_index values must be in [0, nR={nR}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        self.topk_index = idx                   # (B, Hk, nR, k)
        self.region_size, self.num_regions, self.topk = region_size, nR, k
        self.q_len = self.kv_len = nR * region_size
        self.batch, self.heads = B, (Hk if Hk > 1 else None)
        if kv_valid is not None:
            _check_bool("routed_topk kv_valid", kv_valid, 2)
            if kv_valid.shape != (B, self.kv_len) and kv_valid.shape != (1, self.kv_len):
                raise ValueError(f"routed_topk: kv_valid must be (B={B}, nR*S={self.kv_len}), got "
                                 f"{tuple(kv_valid.shape)}")
        self.kv_valid = kv_valid
        self.may_have_empty_rows = kv_valid is not None
        # duplicates in a top-k list are attended once: mark the later copies
        eq = idx[..., :, None] == idx[..., None, :]
        self.dup = torch.tril(eq, diagonal=-1).any(-1)     # (B, Hk, nR, k)

    def to_dense_mask(self):
        B, Hk, nR, k = self.topk_index.shape
        S = self.region_size
        rm = torch.zeros(B, Hk, nR, nR, dtype=torch.bool, device=self.topk_index.device)
        rm.scatter_(-1, self.topk_index, True)
        m = rm.repeat_interleave(S, dim=2).repeat_interleave(S, dim=3)
        if self.kv_valid is not None:
            m = m & self.kv_valid[:, None, None, :]
        return m

    def __repr__(self):
        return (f"RoutedLayout(regions={self.num_regions}, region_size={self.region_size}, "
                f"topk={self.topk}, kv_valid={self.kv_valid is not None})")


def routed_topk(topk_index: torch.Tensor, region_size: int, *, kv_valid: Optional[torch.Tensor] = None
                ) -> RoutedLayout:
    """BiFormer routed attention over region-major tokens (see kernels/API.md)."""
    return RoutedLayout(topk_index, region_size, kv_valid=kv_valid)


# ----------------------------------------------------------------------------------------------
# segments / varlen
# ----------------------------------------------------------------------------------------------
class SegmentLayout(Layout):
    """Query i attends key j iff q_ids[i] == kv_ids[j] >= 0 (block-diagonal for contiguous ids)."""

    kind = "segments"

    def __init__(self, q_ids, kv_ids=None):
        for n, t in (("q_ids", q_ids), ("kv_ids", kv_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool \
                    or t.dim() != 2:
                raise ValueError(f"segments: {n} must be an integer tensor (B, L), got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if kv_ids is None:
            kv_ids = q_ids
        if kv_ids.shape[0] != q_ids.shape[0]:
            raise ValueError(f"segments: q_ids batch {q_ids.shape[0]} != kv_ids batch {kv_ids.shape[0]}")
        self.q_ids, self.kv_ids = q_ids.long(), kv_ids.long()
        self.batch = q_ids.shape[0]
        self.q_len, self.kv_len = q_ids.shape[1], kv_ids.shape[1]
        self._groups = None

    def to_dense_mask(self):
        q, k = self.q_ids[:, :, None], self.kv_ids[:, None, :]
        return ((q == k) & (q >= 0) & (k >= 0))[:, None]

    def groups(self):
        """Pad every (batch, id) segment into a group. Returns (gb (G,), q_index (G, Mq) with -1 pad,
        k_index (G, Nk) with -1 pad). Cached."""
        if self._groups is not None:
            return self._groups
        B = self.batch
        dev = self.q_ids.device
        big = int(max(int(self.q_ids.max()) if self.q_ids.numel() else 0,
                      int(self.kv_ids.max()) if self.kv_ids.numel() else 0)) + 1
        bq = torch.arange(B, device=dev)[:, None] * big
        qkey = torch.where(self.q_ids >= 0, self.q_ids + bq, torch.full_like(self.q_ids, -1)).reshape(-1)
        kkey = torch.where(self.kv_ids >= 0, self.kv_ids + bq, torch.full_like(self.kv_ids, -1)).reshape(-1)
        uniq = torch.unique(qkey[qkey >= 0])
        G = uniq.numel()

        def pack(keys, L):
            sel = torch.nonzero(keys >= 0).squeeze(1)
            pos = torch.searchsorted(uniq, keys[sel]).clamp_max(max(G - 1, 0))
            ok = (G > 0) & (uniq[pos] == keys[sel]) if G > 0 else torch.zeros_like(sel, dtype=torch.bool)
            sel, pos = sel[ok], pos[ok]
            counts = torch.bincount(pos, minlength=G)
            M = int(counts.max()) if counts.numel() else 0
            order = torch.argsort(pos, stable=True)
            sel, pos = sel[order], pos[order]
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(pos.numel(), device=dev) - start[pos]
            out = torch.full((G, max(M, 1)), -1, dtype=torch.long, device=dev)
            out[pos, rank] = sel % L
            return out

        q_index = pack(qkey, self.q_len)
        k_index = pack(kkey, self.kv_len)
        gb = torch.div(uniq, big, rounding_mode="floor")
        self._groups = (gb, q_index, k_index)
        return self._groups


def segments(q_ids: torch.Tensor, kv_ids: Optional[torch.Tensor] = None) -> SegmentLayout:
    """Segment (document / part / group) attention from per-token ids; -1 = padding."""
    return SegmentLayout(q_ids, kv_ids)


def _ids_from_cu(cu, name):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point or cu.numel() < 2:
        raise ValueError(f"varlen: {name} must be a 1-D integer tensor of n+1 cumulative lengths")
    cu = cu.long()
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"varlen: {name} must start at 0 and be non-decreasing, got {cu.tolist()}")
    L = int(cu[-1])
    pos = torch.arange(L, device=cu.device)
    return (torch.searchsorted(cu, pos, right=True) - 1)[None]


def varlen(cu_seqlens_q: torch.Tensor, cu_seqlens_k: Optional[torch.Tensor] = None) -> SegmentLayout:
    """Packed sequences at batch 1 (flash-attn cu_seqlens convention)."""
    qi = _ids_from_cu(cu_seqlens_q, "cu_seqlens_q")
    if cu_seqlens_k is None:
        return SegmentLayout(qi)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError("varlen: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    return SegmentLayout(qi, _ids_from_cu(cu_seqlens_k, "cu_seqlens_k"))


# ----------------------------------------------------------------------------------------------
# causal
# ----------------------------------------------------------------------------------------------
class CausalLayout(Layout):
    """Bottom-right aligned causal mask with optional bidirectional prefix and key padding."""

    kind = "causal"

    def __init__(self, q_len, kv_len=None, prefix=0, kv_valid=None):
        kv_len = q_len if kv_len is None else kv_len
        for n, v in (("q_len", q_len), ("kv_len", kv_len), ("prefix", prefix)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"causal: {n} must be an int >= 0, got {v!r}")
        self.q_len, self.kv_len, self.prefix = q_len, kv_len, prefix
        self.offset = kv_len - q_len
        if kv_valid is not None:
            _check_bool("causal kv_valid", kv_valid, 2)
            if kv_valid.shape[1] != kv_len:
                raise ValueError(f"causal: kv_valid must be (B, kv_len={kv_len}), got {tuple(kv_valid.shape)}")
            self.batch = kv_valid.shape[0]
        self.kv_valid = kv_valid

    def allowed(self, i, j):
        ii = i + self.offset
        return (j <= ii) | ((ii < self.prefix) & (j < self.prefix))

    def to_dense_mask(self):
        dev = self.device
        i = torch.arange(self.q_len, device=dev)[:, None]
        j = torch.arange(self.kv_len, device=dev)[None, :]
        m = self.allowed(i, j)[None, None]
        if self.kv_valid is not None:
            m = m & self.kv_valid[:, None, None, :]
        return m

    def __repr__(self):
        return f"CausalLayout(q_len={self.q_len}, kv_len={self.kv_len}, prefix={self.prefix})"


def causal(q_len: int, kv_len: Optional[int] = None, *, prefix: int = 0,
           kv_valid: Optional[torch.Tensor] = None) -> CausalLayout:
    """Causal attention, last query aligned with last key, optional bidirectional prefix."""
    return CausalLayout(q_len, kv_len, prefix, kv_valid)


# ----------------------------------------------------------------------------------------------
# from_dense_mask
# ----------------------------------------------------------------------------------------------
class MaskLayout(Layout):
    kind = "mask"

    def __init__(self, mask):
        _check_bool("from_dense_mask mask", mask, 4)
        self.mask = mask
        self.batch = mask.shape[0] if mask.shape[0] != 1 else None
        self.heads = mask.shape[1] if mask.shape[1] != 1 else None
        self.q_len, self.kv_len = mask.shape[2], mask.shape[3]

    def to_dense_mask(self):
        return self.mask


def from_dense_mask(mask: torch.Tensor) -> MaskLayout:
    """Arbitrary element mask (B|1, H|1, Lq, Lk), True = attend."""
    return MaskLayout(mask)


# ----------------------------------------------------------------------------------------------
# key_lists
# ----------------------------------------------------------------------------------------------
class KeyListLayout(Layout):
    """Per-query key lists (Sparsifiner connectivity): row i attends the keys listed in index[..., i, :].

    Kept as lists, not as an Lq x Lk mask, so the CPU path (kernels/rowsparse.py) and, for sparse
    lists, the Triton gather kernel (kernels/keylist_triton.py) compute logits only at listed pairs;
    otherwise the equivalent dense mask (`as_mask`) goes to the block-sparse kernels.
    """

    kind = "key_lists"

    def __init__(self, index, kv_len, dense_rows=0, validate=True):
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) \
                or index.dim() != 4:
            raise ValueError("key_lists: index must be an int64/int32 tensor (B|1, H|1, Lq, K), got "
                             f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
        if not isinstance(kv_len, int) or kv_len < 1:
            raise ValueError(f"key_lists: kv_len must be a positive int, got {kv_len!r}")
        Lq = index.shape[2]
        if not isinstance(dense_rows, int) or not 0 <= dense_rows <= Lq:
            raise ValueError(f"key_lists: dense_rows must be an int in [0, Lq={Lq}], got {dense_rows!r}")
        rows = index[:, :, dense_rows:]
        self.has_pad = False
        if validate and rows.numel() and not torch.compiler.is_compiling():
            lo, hi = int(rows.min()), int(rows.max())
            if lo < -1 or hi >= kv_len:
                raise ValueError(f"key_lists: index values must be key positions in [0, kv_len={kv_len}) or -1 "
                                 f"(unused slot), got range [{lo}, {hi}]")
            if rows.shape[-1] > 1:
                srt = rows.sort(-1).values
                if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
                    raise ValueError("key_lists: a query row lists the same key twice; each row's keys must be "
                                     "distinct (as from topk), with -1 for unused slots")
            self.has_pad = lo < 0
        elif validate:      # traced (compile): assume unused slots, which is exact either way
            self.has_pad = True
        self.index = index
        self.dense_rows = dense_rows
        self.q_len, self.kv_len = Lq, kv_len
        self.batch = index.shape[0] if index.shape[0] != 1 else None
        self.heads = index.shape[1] if index.shape[1] != 1 else None
        self.may_have_empty_rows = self.has_pad or (dense_rows < Lq and index.shape[-1] == 0)
        self._cache = {}

    def to_dense_mask(self):
        B, H, Lq, K = self.index.shape
        m = torch.zeros(B, H, Lq, self.kv_len + 1, dtype=torch.bool, device=self.index.device)
        m.scatter_(-1, torch.where(self.index >= 0, self.index, self.kv_len), True)
        m = m[..., :self.kv_len].contiguous()
        m[:, :, :self.dense_rows] = True
        return m

    def as_mask(self) -> "MaskLayout":
        return MaskLayout(self.to_dense_mask())

    def __repr__(self):
        return (f"KeyListLayout(q_len={self.q_len}, kv_len={self.kv_len}, keys_per_row={self.index.shape[-1]}, "
                f"dense_rows={self.dense_rows})")


def key_lists(index: torch.Tensor, kv_len: int, *, dense_rows: int = 0, validate: bool = True
              ) -> KeyListLayout:
    """Query i attends keys index[b, h, i, :] (B|1, H|1, Lq, K); -1 marks an unused slot.

    The first `dense_rows` query rows attend every key (their index rows are ignored), e.g. the cls
    row of Sparsifiner. Keys in a row must be distinct. `validate=False` skips the range and
    uniqueness checks for callers that guarantee distinct keys in [0, kv_len) and no -1 (top-k
    indices): the checks cost about as much as the sparse attention itself.
    """
    return KeyListLayout(index, kv_len, dense_rows=dense_rows, validate=validate)
