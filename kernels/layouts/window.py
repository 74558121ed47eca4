"""`window_2d`: HaloNet-style blocked local attention on an h x w map, and all its lowerings.

Tokens are row-major. Each block x block query block (subsampled by `stride`) attends the
(block + 2·halo)² window around it; `border="zero"` keeps the out-of-map window positions as
virtual keys (k = v = 0, timm semantics), `border="clamp"` shifts the window inside the map
(NATTEN). Lowerings: reference plan = one group per query block with its window unfolded
(`_WindowPlan`); Triton = 2-D key tiles anchored at (-halo, -halo) so interior windows are covered
without waste, the window predicate in partial tiles; Flex = a mask_mod on the (padded) map.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..bias import _rel_to_abs
from ..lut import from_matrix, next_pow2, span_choice
from ..reference.core import Plan
from .base import Layout, check_bool, triton_kv_valid

__all__ = ["WindowLayout", "window_2d"]


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
            check_bool("window_2d kv_valid", kv_valid, 2)
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
        Clamp: assumed possible (shifted windows are not checked); so is every window inside a
        compiled / exported graph, which cannot branch on tensor data."""
        if self.border != "zero" or torch.compiler.is_compiling():
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

    # -- lowerings ----------------------------------------------------------------------------------
    local_positions = True          # RelPosBias offsets are local to the query block / its window
    linear_tiles = False

    @property
    def dense_mask_exact(self):
        return self.border != "zero"    # zero border: virtual keys are not in the dense mask

    def flatten(self):
        return ([self.kv_valid] if self.kv_valid is not None else []), \
            [self.h, self.w, self.block, self.halo, int(self.border == "clamp"), self.stride]

    @classmethod
    def unflatten(cls, tensors, ints):
        h, w, block, halo, clamp, stride = ints
        return cls(h, w, block, halo, border="clamp" if clamp else "zero", stride=stride,
                   kv_valid=tensors[0] if tensors else None)

    def oracle_keys(self, k, v):
        if self.border != "zero":
            return super().oracle_keys(k, v)
        B, H = k.shape[:2]
        hp, wp = self.h + 2 * self.halo, self.w + 2 * self.halo

        def padmap(t):
            m = t.view(B, H, self.h, self.w, t.shape[-1])
            return F.pad(m, (0, 0, self.halo, self.halo, self.halo, self.halo)).reshape(B, H, hp * wp, t.shape[-1])

        return padmap(k), padmap(v), self._padded_kmap(k.device), self.to_dense_mask(include_virtual=True)

    def _padded_kmap(self, dev):
        """Natural key index of each position of the zero-padded map (-1: virtual key)."""
        hp, wp = self.h + 2 * self.halo, self.w + 2 * self.halo
        yy = torch.arange(hp, device=dev)[:, None] - self.halo
        xx = torch.arange(wp, device=dev)[None] - self.halo
        inside = (yy >= 0) & (yy < self.h) & (xx >= 0) & (xx < self.w)
        return torch.where(inside, yy * self.w + xx, torch.full_like(yy * xx, -1)).reshape(-1)

    def _query_geometry(self, dev):
        """Per query: window start (sy, sx) in key-slot coords (the padded map for border='zero')
        and local position (ly, lx) inside its query block."""
        wq = self.w // self.stride
        i = torch.arange(self.q_len, device=dev)
        qy, qx = i // wq, i % wq
        by, bx = qy // self.bq, qx // self.bq
        if self.border == "zero":
            sy, sx = by * self.block, bx * self.block
        else:
            sy_b, sx_b = self.starts(dev)
            sy, sx = sy_b[by], sx_b[bx]
        return sy, sx, qy % self.bq, qx % self.bq

    def local_offsets(self, kidx, dev):
        """(dy, dx) (Lq, Nk): key position in the query's window minus the query's position in its
        block, for the oracle's key slots (the padded map for border='zero', else natural keys)."""
        sy, sx, ly, lx = self._query_geometry(dev)
        if self.border == "zero":
            slot = torch.arange(kidx.numel(), device=dev)[None, :]
            wp = self.w + 2 * self.halo
            ky, kx = slot // wp, slot % wp
        else:
            jc = kidx.clamp_min(0)[None, :]
            ky, kx = jc // self.w, jc % self.w
        return ky - sy[:, None] - ly[:, None], kx - sx[:, None] - lx[:, None]

    def block_lut(self, Lq, Lk, dev, block_m, block_n, tile_cap):
        bq = self.bq
        QX = next_pow2(bq)
        QY = max(next_pow2(bq), -(-16 // QX))
        zero = self.border == "zero"
        KSY = span_choice(self.block, self.win_h, tile_cap)
        KSX = span_choice(self.block, self.win_w, tile_cap)
        KTY, KTX = next_pow2(KSY), next_pow2(KSX)
        while KTY * KTX < 16:
            KTY *= 2
        ay = ax = self.halo if zero else 0
        ext_h = self.h + (2 * self.halo if zero else 0)
        ext_w = self.w + (2 * self.halo if zero else 0)
        nty, ntx = -(-ext_h // KSY), -(-ext_w // KSX)
        sy, sx = self.starts(dev)

        def axis(starts, size, n, span, anchor, L):
            t0 = torch.arange(n, device=dev) * span - anchor
            t1 = t0 + span
            s0, s1 = starts[:, None], (starts + size)[:, None]
            overlap = (t0[None] < s1) & (t1[None] > s0)
            inside = (t0[None] >= s0) & (t1[None] <= s1)
            if not zero:
                inside = inside & (t0[None] >= 0) & (t1[None] <= L)
            return overlap, inside

        oy, iy = axis(sy, self.win_h, nty, KSY, ay, self.h)
        ox, ix = axis(sx, self.win_w, ntx, KSX, ax, self.w)
        overlap = oy[:, None, :, None] & ox[None, :, None, :]
        inside = iy[:, None, :, None] & ix[None, :, None, :]
        if self.kv_valid is not None:
            inside = torch.zeros_like(inside)
        C = torch.where(inside, 2, torch.where(overlap, 1, 0)).to(torch.int8)
        C = C.reshape(self.nby * self.nbx, nty * ntx)[None, None].contiguous()
        geo = dict(q_mode=1, k_mode=1, QS=bq, BM=QY * QX, QX=QX, KS=1, KSY=KSY, KSX=KSX, KTY=KTY, KTX=KTX,
                   BN=KTY * KTX, ntx=ntx, ay=ay, ax=ax, k_pad=True)
        return from_matrix(C, **geo)

    def triton_args(self, dev):
        from ..triton.bundles import Geometry
        geo = Geometry(bq=self.bq, nbx=self.nbx, wq=self.w // self.stride, block=self.block, halo=self.halo,
                       win_h=self.win_h, win_w=self.win_w, mh=self.h, mw=self.w)
        return dict(geometry=geo, features=dict(CLAMP=self.border == "clamp"), **triton_kv_valid(self.kv_valid, dev))

    def reference_plan(self, B, H, dev):
        return _WindowPlan(self, B, H, dev)

    def flex_lowering(self, q, k, v):
        B, H = q.shape[:2]
        dev = q.device
        sy, sx, ly, lx = self._query_geometry(dev)
        kmap = None
        if self.border == "zero":
            hp, wp = self.h + 2 * self.halo, self.w + 2 * self.halo

            def pad(t):
                m = t.view(B, H, self.h, self.w, t.shape[-1])
                return F.pad(m, (0, 0, self.halo, self.halo, self.halo, self.halo)).reshape(B, H, hp * wp, -1)

            k, v = pad(k), pad(v)
            kmap = self._padded_kmap(dev)
            gw, wh, ww = wp, self.win, self.win
        else:
            gw, wh, ww = self.w, self.win_h, self.win_w
        kvv = self.kv_valid

        def mask_mod(b, h, qi, ki):
            ky, kx = ki // gw, ki % gw
            ok = (ky >= sy[qi]) & (ky < sy[qi] + wh) & (kx >= sx[qi]) & (kx < sx[qi] + ww)
            if kvv is not None:
                if kmap is not None:
                    nat = kmap[ki]
                    ok = ok & ((nat < 0) | kvv[b, nat.clamp(min=0)])
                else:
                    ok = ok & kvv[b, ki]
            return ok

        def local(qi, ki):
            return ki // gw - sy[qi] - ly[qi], ki % gw - sx[qi] - lx[qi]

        nat = (lambda ki: kmap[ki]) if kmap is not None else (lambda ki: ki)
        return dict(k=k, v=v, mask_mod=mask_mod, nat=nat, local=local)

    def __repr__(self):
        return (f"WindowLayout(h={self.h}, w={self.w}, block={self.block}, halo={self.halo}, "
                f"border={self.border!r}, stride={self.stride}, kv_valid={self.kv_valid is not None})")


def window_2d(h: int, w: int, block: int, halo: int, *, border: str = "zero", stride: int = 1,
              kv_valid: Optional[torch.Tensor] = None) -> WindowLayout:
    """HaloNet-style blocked local attention (see kernels/API.md)."""
    return WindowLayout(h, w, block, halo, border=border, stride=stride, kv_valid=kv_valid)



class _WindowPlan(Plan):
    def __init__(self, lay: WindowLayout, B, H, dev):
        self.lay, self.B, self.H, self.dev = lay, B, H, dev
        self.units = lay.nby                                   # one unit = one row of blocks
        self.G = lay.nby * lay.nbx
        self.M, self.N = lay.bq * lay.bq, lay.win_h * lay.win_w
        self.unit_cost = B * H * lay.nbx * self.M * self.N
        self.safe = lay.may_have_empty_rows
        self.qi = lay.q_index(dev)
        self.ki = lay.k_index(dev)
        if lay.border == "clamp":
            sy, sx = lay.starts(dev)
            self.ry = sy[:, None] + torch.arange(lay.win_h, device=dev)
            self.cx = (sx[:, None] + torch.arange(lay.win_w, device=dev)).reshape(-1)
        if lay.kv_valid is not None:
            kv = lay.kv_valid.view(-1, 1, lay.h, lay.w, 1)
            self.valid_map = kv

    def _blocks_q(self, q):
        lay = self.lay
        B, H, _, D = q.shape
        bq = lay.bq
        return (q.view(B, H, lay.nby, bq, lay.nbx, bq, D).permute(0, 1, 2, 4, 3, 5, 6)
                .reshape(B, H, self.G, bq * bq, D))

    def _windows(self, t, r0, r1, pad_value=0.0):
        """(Bt, Ht, h*w, C) -> windows of block rows r0:r1: (Bt, Ht, (r1-r0)*nbx, wh*ww, C)."""
        lay = self.lay
        Bt, Ht, _, C = t.shape
        m = t.view(Bt, Ht, lay.h, lay.w, C)
        rc = r1 - r0
        if lay.border == "zero":
            a = r0 * lay.block
            b = r1 * lay.block + 2 * lay.halo
            # slice rows first, then pad, so only this chunk's strip is copied
            lo, hi = a - lay.halo, b - lay.halo
            strip = m[:, :, max(lo, 0):min(hi, lay.h)]
            strip = F.pad(strip, (0, 0, lay.halo, lay.halo, max(0, -lo), max(0, hi - lay.h)), value=pad_value)
            u = strip.unfold(2, lay.win, lay.block).unfold(3, lay.win, lay.block)   # (Bt,Ht,rc,nbx,C,win,win)
            return u.permute(0, 1, 2, 3, 5, 6, 4).reshape(Bt, Ht, rc * lay.nbx, self.N, C)
        rows = m[:, :, self.ry[r0:r1].reshape(-1)]                  # (Bt,Ht,rc*wh,w,C)
        g = rows[:, :, :, self.cx]                                   # (Bt,Ht,rc*wh,nbx*ww,C)
        g = g.view(Bt, Ht, rc, lay.win_h, lay.nbx, lay.win_w, C).permute(0, 1, 2, 4, 3, 5, 6)
        return g.reshape(Bt, Ht, rc * lay.nbx, self.N, C)

    def get(self, u0, u1, q, k, v):
        lay = self.lay
        g0, g1 = u0 * lay.nbx, u1 * lay.nbx
        qg = self._blocks_rows(q, u0, u1)
        kg = self._windows(k, u0, u1)
        vg = self._windows(v, u0, u1)
        mask = None
        if lay.kv_valid is not None:
            vm = self._windows(lay.kv_valid.view(lay.kv_valid.shape[0], 1, -1, 1), u0, u1, pad_value=True)
            mask = vm[..., 0].unsqueeze(-2)                          # (Bv, 1, Gc, 1, N)
        ctx = dict(qi=self.qi[g0:g1], ki=self.ki[None, None, g0:g1],
                   local_relpos=lambda rh, rw: self._local_relpos(rh, rw, u0, u1))
        return qg, kg, vg, mask, ctx

    def _blocks_rows(self, t, u0, u1):
        """(Bt, Ht, Lq, C) natural -> (Bt, Ht, (u1-u0)*nbx, bq*bq, C) for block rows u0:u1."""
        lay = self.lay
        bq, wq = lay.bq, lay.w // lay.stride
        Bt, Ht, _, C = t.shape
        t = t[:, :, u0 * bq * wq: u1 * bq * wq]
        return (t.reshape(Bt, Ht, u1 - u0, bq, lay.nbx, bq, C).permute(0, 1, 2, 4, 3, 5, 6)
                .reshape(Bt, Ht, (u1 - u0) * lay.nbx, bq * bq, C))

    def assemble(self, out, lse):
        lay = self.lay
        B, H, G, M, Dv = out.shape
        bq = lay.bq
        o = out.view(B, H, lay.nby, lay.nbx, bq, bq, Dv).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, -1, Dv)
        l = None
        if lse is not None:
            l = lse.view(B, H, lay.nby, lay.nbx, bq, bq).permute(0, 1, 2, 4, 3, 5).reshape(B, H, -1)
        return o, l


    def _local_relpos(self, rh, rw, u0, u1):
        """Separable window rel-pos terms (timm's rel_to_abs): rows of each block pick their shifted
        slice of rel_h / rel_w -> (gh (.., Gc, M, win_h), gw (.., Gc, M, win_w)), added to the score
        tile as rows and columns."""
        lay, bq = self.lay, self.lay.bq
        rows_h, rows_w = self._blocks_rows(rh, u0, u1), self._blocks_rows(rw, u0, u1)
        lead = rows_h.shape[:-2]
        M = bq * bq
        gh = _rel_to_abs(rows_h.view(*lead, bq, bq, rh.shape[-1]).transpose(-2, -3), lay.win_h).transpose(-2, -3)
        gw = _rel_to_abs(rows_w.view(*lead, bq, bq, rw.shape[-1]), lay.win_w)
        return gh.reshape(*lead, M, lay.win_h), gw.reshape(*lead, M, lay.win_w)
