"""Triton kernels for multi-scale deformable attention (forward, backward, deterministic grad).

Layouts (contiguous; checked by the caller in ``msda/op.py``): value (N, S, M, D), sampling_locations
(N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P), output / grad_output (N, Lq, M*D).
The row of a (n, q, m) triple is ``(n*Lq + q)*M + m``: it indexes the output in units of D and
the per-sample tensors in units of L*P.

One program handles BLOCK_Q queries of one (image, head) pair and all K = L*P samples of each at
once: per bilinear corner it gathers a (BLOCK_Q, K, BLOCK_D) tile of contiguous D-vectors (the
level of sample k is k // P; its h, w and start offset are looked up per sample). The backward
recomputes the sampling. grad_value is either scattered with fp32 atomics (fast; the summation
order varies run to run) or, for ``deterministic``, gathered: the (value row, weight, query row)
contributions are sorted by value row with a stable sort and ``msda_grad_value_gather_kernel``
sums each row's list in that fixed order.

Importing this module never fails: without triton ``AVAILABLE`` is False and no kernel exists.
"""
import os

try:  # triton is optional; CPU-only installs use the PyTorch reference
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - covered by the "triton absent" subprocess test
    triton = None
    tl = None

AVAILABLE = triton is not None
# triton decides between interpreter and compiler when a function is decorated, i.e. right here
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

__all__ = ["AVAILABLE", "INTERPRETER", "forward", "backward", "corner_contributions"]

if AVAILABLE:

    @triton.jit
    def _source_coord(loc, size_f, BORDER: tl.constexpr, ALIGN: tl.constexpr):
        """grid_sample's unnormalisation of ``2*loc - 1`` and padding; returns (coord, dcoord/dloc)."""
        if ALIGN:
            c = loc * (size_f - 1.0)
            scale = size_f - 1.0
        else:
            c = loc * size_f - 0.5
            scale = size_f
        if BORDER:
            # clipped like grid_sample, which counts the borders themselves as clipped (zero grad)
            inside = (c > 0.0) & (c < size_f - 1.0)
            c = tl.minimum(tl.maximum(c, 0.0), size_f - 1.0)
            dcoord = tl.where(inside, scale, 0.0)
        else:
            # beyond [-1, size] every corner is outside anyway; the clamp only keeps the later
            # float -> int conversion in range for wild locations
            c = tl.minimum(tl.maximum(c, -2.0), size_f + 1.0)
            dcoord = scale + 0.0 * c
        return c, dcoord

    @triton.jit
    def _load_samples(loc_ptr, attn_ptr, shapes_ptr, starts_ptr, row, q_mask,
                      L: tl.constexpr, P: tl.constexpr, BLOCK_K: tl.constexpr,
                      BORDER: tl.constexpr, ALIGN: tl.constexpr):
        """Per (query, sample): attention weight, top-left corner, fractions, level geometry."""
        offs_k = tl.arange(0, BLOCK_K)
        k_mask = offs_k < L * P
        lvl = offs_k // P
        h = tl.load(shapes_ptr + 2 * lvl, mask=k_mask, other=1)[None, :]
        w = tl.load(shapes_ptr + 2 * lvl + 1, mask=k_mask, other=1)[None, :]
        start = tl.load(starts_ptr + lvl, mask=k_mask, other=0)[None, :]
        qk_mask = q_mask[:, None] & k_mask[None, :]
        k = row[:, None] * (L * P) + offs_k[None, :]  # (BLOCK_Q, BLOCK_K) sample index
        lx = tl.load(loc_ptr + 2 * k, mask=qk_mask, other=0.0).to(tl.float32)
        ly = tl.load(loc_ptr + 2 * k + 1, mask=qk_mask, other=0.0).to(tl.float32)
        a = tl.load(attn_ptr + k, mask=qk_mask, other=0.0).to(tl.float32)
        x, dx = _source_coord(lx, w.to(tl.float32), BORDER, ALIGN)
        y, dy = _source_coord(ly, h.to(tl.float32), BORDER, ALIGN)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        return (k, qk_mask, a, x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f, dx, dy,
                h, w, start)

    @triton.jit
    def _corner(n, start, y, x, h, w, S, M, m, D, qk_mask):
        """Element offset of value[n, start + y*w + x, m, 0] and whether that pixel exists (int64
        offsets when ``n`` is int64, else int32)."""
        valid = qk_mask & (x >= 0) & (x < w) & (y >= 0) & (y < h)
        s = tl.where(valid, start + y * w + x, 0)
        return ((n * S + s) * M + m) * D, valid

    @triton.jit
    def msda_fwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
        S, Lq, M, D,
        L: tl.constexpr, P: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        BORDER: tl.constexpr, ALIGN: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_nm = tl.program_id(1)
        n64 = (pid_nm // M).to(tl.int64)
        m = pid_nm % M
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = offs_q < Lq
        d_mask = offs_d < D
        row = (n64 * Lq + offs_q) * M + m
        _k, qk_mask, a, x0, y0, fx, fy, _dx, _dy, h, w, start = _load_samples(
            loc_ptr, attn_ptr, shapes_ptr, starts_ptr, row, q_mask, L, P, BLOCK_K, BORDER, ALIGN)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for c in tl.static_range(4):
            cx = c % 2
            cy = c // 2
            wgt = a * (cx * fx + (1 - cx) * (1.0 - fx)) * (cy * fy + (1 - cy) * (1.0 - fy))
            base, valid = _corner(n64, start, y0 + cy, x0 + cx, h, w, S, M, m, D, qk_mask)
            v = tl.load(value_ptr + base[:, :, None] + offs_d[None, None, :],
                        mask=valid[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wgt[:, :, None] * v, axis=1)
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=q_mask[:, None] & d_mask[None, :])

    @triton.jit
    def msda_bwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, gout_ptr,
        gvalue_ptr, gloc_ptr, gattn_ptr,
        S, Lq, M, D, total,
        L: tl.constexpr, P: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
        BORDER: tl.constexpr, ALIGN: tl.constexpr, SCATTER_VALUE: tl.constexpr,
        IDX64: tl.constexpr,
    ):
        """Sample-major: one program takes BLOCK_S consecutive samples of the flattened
        (n, q, m, l, p) axis, so every tile is (BLOCK_S, BLOCK_D) and every per-sample result is
        one coalesced vector. Writes fp32 grad loc / grad attn (one owner per element); with
        SCATTER_VALUE also atomically adds into the fp32 grad_value buffer."""
        if IDX64:
            offs_s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        else:  # int32 offsets when every tensor has < 2**31 elements: half the index registers
            offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_mask = offs_s < total
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        row = offs_s // (L * P)  # (n, q, m) row of grad_out
        lvl = (offs_s % (L * P)) // P
        m = row % M
        n = row // (Lq * M)
        h = tl.load(shapes_ptr + 2 * lvl, mask=s_mask, other=1).to(offs_s.dtype)
        w = tl.load(shapes_ptr + 2 * lvl + 1, mask=s_mask, other=1).to(offs_s.dtype)
        start = tl.load(starts_ptr + lvl, mask=s_mask, other=0).to(offs_s.dtype)
        lx = tl.load(loc_ptr + 2 * offs_s, mask=s_mask, other=0.0).to(tl.float32)
        ly = tl.load(loc_ptr + 2 * offs_s + 1, mask=s_mask, other=0.0).to(tl.float32)
        a = tl.load(attn_ptr + offs_s, mask=s_mask, other=0.0).to(tl.float32)
        x, dx = _source_coord(lx, w.to(tl.float32), BORDER, ALIGN)
        y, dy = _source_coord(ly, h.to(tl.float32), BORDER, ALIGN)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        fx = x - x0f
        fy = y - y0f
        x0 = x0f.to(offs_s.dtype)
        y0 = y0f.to(offs_s.dtype)
        go = tl.load(gout_ptr + row[:, None] * D + offs_d[None, :],
                     mask=s_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        g_attn = tl.zeros((BLOCK_S,), dtype=tl.float32)
        g_fx = tl.zeros((BLOCK_S,), dtype=tl.float32)
        g_fy = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for c in tl.static_range(4):
            cx = c % 2
            cy = c // 2
            wx = cx * fx + (1 - cx) * (1.0 - fx)
            wy = cy * fy + (1 - cy) * (1.0 - fy)
            base, valid = _corner(n, start, y0 + cy, x0 + cx, h, w, S, M, m, D, s_mask)
            ptrs = base[:, None] + offs_d[None, :]
            mask2 = valid[:, None] & d_mask[None, :]
            v = tl.load(value_ptr + ptrs, mask=mask2, other=0.0).to(tl.float32)
            t = tl.sum(go * v, axis=1)  # <grad_out, corner value>
            g_attn += wx * wy * t
            g_fx += (2 * cx - 1) * wy * t
            g_fy += (2 * cy - 1) * wx * t
            if SCATTER_VALUE:
                tl.atomic_add(gvalue_ptr + ptrs, (a * wx * wy)[:, None] * go, mask=mask2, sem="relaxed")
        tl.store(gattn_ptr + offs_s, g_attn, mask=s_mask)
        tl.store(gloc_ptr + 2 * offs_s, a * g_fx * dx, mask=s_mask)
        tl.store(gloc_ptr + 2 * offs_s + 1, a * g_fy * dy, mask=s_mask)

    @triton.jit
    def msda_grad_value_gather_kernel(
        offsets_ptr, src_ptr, weight_ptr, gout_ptr, gvalue_ptr, R, D,
        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """grad_value row r = sum_e weight[e] * grad_out[src[e]] over e in [offsets[r], offsets[r+1]),
        BLOCK_E entries at a time in list order: a fixed summation order, hence reproducible."""
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        begin = tl.load(offsets_ptr + offs_r, mask=r_mask, other=0)
        count = tl.load(offsets_ptr + offs_r + 1, mask=r_mask, other=0) - begin
        offs_e = tl.arange(0, BLOCK_E)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        longest = tl.max(count, axis=0)
        for e0 in range(0, longest, BLOCK_E):
            e_mask = (e0 + offs_e)[None, :] < count[:, None]  # (BLOCK_R, BLOCK_E)
            e = begin[:, None] + e0 + offs_e[None, :]
            src = tl.load(src_ptr + e, mask=e_mask, other=0)
            wt = tl.load(weight_ptr + e, mask=e_mask, other=0.0)
            g = tl.load(gout_ptr + src[:, :, None] * D + offs_d[None, None, :],
                        mask=e_mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wt[:, :, None] * g, axis=1)
        tl.store(gvalue_ptr + offs_r[:, None] * D + offs_d[None, :], acc,
                 mask=r_mask[:, None] & d_mask[None, :])


# elements per program tile: forward (BLOCK_Q, BLOCK_K, BLOCK_D), backward (BLOCK_S, BLOCK_D). Chosen so
# that nothing spills when compiled for sm_90 at L=P=4, D=32 with 4 warps (triton 3.8, cuobjdump
# resource usage, see `tools/bench_msda.py --compile-only 90`: forward 8x16x32 -> <= 100 registers,
# backward 32x32 -> <= 217 with atomics; a 64x32 backward tile spills). Not tuned on a GPU.
FWD_TILE = 4096
BWD_TILE = 1024


def _needs_int64(*tensors):
    return max(t.numel() for t in tensors) * 2 >= 2 ** 31


def _tile(L, P, D, budget):
    """(BLOCK_Q, BLOCK_K, BLOCK_D, num_warps) with BLOCK_Q*BLOCK_K*BLOCK_D <= budget elements."""
    block_k = triton.next_power_of_2(max(1, L * P))
    block_d = triton.next_power_of_2(max(1, int(D)))
    block_q = max(1, min(64, budget // (block_k * block_d)))
    return block_q, block_k, block_d, 4


def forward(value, shapes, starts, loc, attn, border, align):
    """value (N,S,M,D), shapes (L,2) int64, starts (L,) int64, loc (N,Lq,M,L,P,2), attn
    (N,Lq,M,L,P), contiguous on one device -> (N, Lq, M*D) in value's dtype."""
    import torch

    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.empty((N, Lq, M * D), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    block_q, block_k, block_d, warps = _tile(L, P, D, FWD_TILE)
    grid = (triton.cdiv(Lq, block_q), N * M)
    msda_fwd_kernel[grid](
        value, shapes, starts, loc, attn, out, S, Lq, M, D,
        L=L, P=P, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d,
        BORDER=bool(border), ALIGN=bool(align), num_warps=warps,
    )
    return out


def corner_contributions(loc, attn, shapes, starts, S, M, border, align):
    """For ONE image, loc (Lq,M,L,P,2), attn (Lq,M,L,P): the value row ``s*M + m`` each
    (q, m, l, p, corner) reads (S*M when the corner is off the map) and its weight attn * bilinear
    weight, flattened in (q, m, l, p, corner) order. Same arithmetic as the kernels, in fp32."""
    import torch

    L = loc.shape[2]
    h = shapes[:, 0].view(1, 1, L, 1)
    w = shapes[:, 1].view(1, 1, L, 1)

    def coord(v, size):
        size = size.float()
        c = v * (size - 1.0) if align else v * size - 0.5
        lo, hi = (0.0, size - 1.0) if border else (-2.0, size + 1.0)
        return torch.minimum(torch.clamp(c, min=lo), hi)

    x = coord(loc[..., 0].float(), w)
    y = coord(loc[..., 1].float(), h)
    x0f, y0f = torch.floor(x), torch.floor(y)
    fx, fy = x - x0f, y - y0f
    x0, y0 = x0f.long(), y0f.long()
    m_idx = torch.arange(M, device=loc.device).view(1, M, 1, 1)
    start = starts.view(1, 1, L, 1)
    a = attn.float()
    rows, wts = [], []
    for c in range(4):
        cx, cy = c % 2, c // 2
        xc, yc = x0 + cx, y0 + cy
        valid = (xc >= 0) & (xc < w) & (yc >= 0) & (yc < h)
        r = (start + yc * w + xc) * M + m_idx
        rows.append(torch.where(valid, r, torch.full_like(r, S * M)))
        wts.append(a * (fx if cx else 1.0 - fx) * (fy if cy else 1.0 - fy))
    return torch.stack(rows, -1).flatten(), torch.stack(wts, -1).flatten()


def _grad_value_sorted(value, shapes, starts, loc, attn, grad_out, border, align):
    """Deterministic grad_value, one image at a time (bounded memory): stable-sort the corner
    contributions by value row, then sum each row's list in order."""
    import torch

    N, S, M, D = value.shape
    L, P = loc.shape[3], loc.shape[4]
    gvalue = torch.zeros((N, S, M, D), dtype=torch.float32, device=value.device)
    if loc.shape[1] == 0 or S == 0:
        return gvalue
    block_r, block_e = 16, 8
    block_d = triton.next_power_of_2(max(1, int(D)))
    bounds = torch.arange(S * M + 1, device=value.device)
    for n in range(N):
        rows, wts = corner_contributions(loc[n], attn[n], shapes, starts, S, M, border, align)
        rows_sorted, perm = torch.sort(rows, stable=True)
        src = (perm // (L * P * 4)).contiguous()  # (q, m) row of grad_out[n], in units of D
        wts = wts[perm].contiguous()
        offsets = torch.searchsorted(rows_sorted, bounds).contiguous()
        msda_grad_value_gather_kernel[(triton.cdiv(S * M, block_r),)](
            offsets, src, wts, grad_out[n], gvalue[n], S * M, D,
            BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4,
        )
    return gvalue


def backward(value, shapes, starts, loc, attn, grad_out, border, align, need_value, deterministic):
    """Returns fp32 (grad_value or None, grad_loc, grad_attn)."""
    import torch

    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    dev = value.device
    gloc = torch.zeros(loc.shape, dtype=torch.float32, device=dev)
    gattn = torch.zeros(attn.shape, dtype=torch.float32, device=dev)
    scatter = bool(need_value and not deterministic)
    gvalue = torch.zeros(value.shape, dtype=torch.float32, device=dev) if need_value else None
    total = N * Lq * M * L * P
    if total > 0:
        block_d = triton.next_power_of_2(max(1, int(D)))
        block_s = max(1, min(128, BWD_TILE // block_d))
        msda_bwd_kernel[(triton.cdiv(total, block_s),)](
            value, shapes, starts, loc, attn, grad_out,
            gvalue if scatter else gloc, gloc, gattn, S, Lq, M, D, total,
            L=L, P=P, BLOCK_S=block_s, BLOCK_D=block_d,
            BORDER=bool(border), ALIGN=bool(align), SCATTER_VALUE=scatter,
            IDX64=_needs_int64(value, loc, grad_out), num_warps=4,
        )
        if need_value and not scatter:
            gvalue = _grad_value_sorted(value, shapes, starts, loc, attn, grad_out, border, align)
    return gvalue, gloc, gattn
