"""backend="flex": compiled PyTorch FlexAttention, CUDA only, for comparison.

Layouts become a mask_mod over natural token indices (routed reads a dense region table, so the
compiled block structure and the eager mask agree); biases and the GMM become a score_mod over
captured tensors. border="zero" windows append their virtual keys explicitly: K/V are padded to the
(h+2·halo)² map, as the dense oracle does.
"""
import torch
import torch.nn.functional as F

from .bias import GaussianMixture, IndexedBias, RelPosBias
from .layout import CausalLayout, MaskLayout, RoutedLayout, SegmentLayout, WindowLayout

__all__ = ["flex_attention_backend"]

_COMPILED = {}


def _flex():
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def _window_geometry(lay: WindowLayout, dev):
    """Per query: window start (sy, sx) in key-grid coords and local (ly, lx); key grid width."""
    wq = lay.w // lay.stride
    i = torch.arange(lay.q_len, device=dev)
    qy, qx = i // wq, i % wq
    by, bx = qy // lay.bq, qx // lay.bq
    sy_b, sx_b = lay.starts(dev)
    if lay.border == "zero":      # key grid is the padded map: window start = block origin
        sy, sx = by * lay.block, bx * lay.block
    else:
        sy, sx = sy_b[by], sx_b[bx]
    return sy, sx, qy % lay.bq, qx % lay.bq


def flex_attention_backend(q, k, v, layout, scale, bias, score_mod, return_lse):
    if q.device.type != "cuda":
        raise ValueError(f"attention: backend='flex' needs CUDA tensors, got {q.device}")
    from torch.nn.attention.flex_attention import create_block_mask
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    dev = q.device
    kmap = None                    # key slot -> natural key index (-1 = virtual), zero-border windows
    mask_mod = None
    lay = layout
    if isinstance(lay, WindowLayout):
        sy, sx, ly, lx = _window_geometry(lay, dev)
        if lay.border == "zero":
            hp, wp = lay.h + 2 * lay.halo, lay.w + 2 * lay.halo

            def pad(t):
                m = t.view(B, H, lay.h, lay.w, t.shape[-1])
                return F.pad(m, (0, 0, lay.halo, lay.halo, lay.halo, lay.halo)).reshape(B, H, hp * wp, -1)

            k, v = pad(k), pad(v)
            yy = torch.arange(hp, device=dev)[:, None] - lay.halo
            xx = torch.arange(wp, device=dev)[None] - lay.halo
            inside = (yy >= 0) & (yy < lay.h) & (xx >= 0) & (xx < lay.w)
            kmap = torch.where(inside, yy * lay.w + xx, torch.full_like(yy * xx, -1)).reshape(-1)
            gw, wh, ww = wp, lay.win, lay.win
        else:
            gw, wh, ww = lay.w, lay.win_h, lay.win_w
        kvv = lay.kv_valid

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
    elif isinstance(lay, RoutedLayout):
        S = lay.region_size
        idx = lay.topk_index
        table = torch.zeros(*idx.shape[:3], lay.num_regions, dtype=torch.bool, device=dev)
        table.scatter_(-1, idx, True)                                  # (B, Hk, nR, nR) region table
        hk = table.shape[1]
        kvv = lay.kv_valid

        def mask_mod(b, h, qi, ki):
            ok = table[b, h if hk > 1 else 0, qi // S, ki // S]
            if kvv is not None:
                ok = ok & kvv[b, ki]
            return ok
    elif isinstance(lay, SegmentLayout):
        qids, kids = lay.q_ids, lay.kv_ids

        def mask_mod(b, h, qi, ki):
            return (qids[b, qi] == kids[b, ki]) & (qids[b, qi] >= 0)
    elif isinstance(lay, CausalLayout):
        off, P, kvv = lay.offset, lay.prefix, lay.kv_valid

        def mask_mod(b, h, qi, ki):
            ii = qi + off
            ok = (ki <= ii) | ((ii < P) & (ki < P))
            if kvv is not None:
                ok = ok & kvv[b, ki]
            return ok
    elif isinstance(lay, MaskLayout):
        m = lay.mask
        mb, mh = m.shape[0], m.shape[1]

        def mask_mod(b, h, qi, ki):
            return m[b if mb > 1 else 0, h if mh > 1 else 0, qi, ki]

    nat = (lambda ki: kmap[ki]) if kmap is not None else (lambda ki: ki)
    mods = []
    if score_mod is not None:
        gm: GaussianMixture = score_mod
        P, gwid = gm.num_prefix_tokens, gm.grid[1]
        al, sg = gm.alpha, gm.sigma
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
            if gm.mode == "mul":
                return score * torch.where(mod, m, 1.0)
            return score + torch.where(mod, m, 0.0)
        mods.append(gmm)
    if isinstance(bias, torch.Tensor):
        bt = bias
        while bt.dim() < 4:
            bt = bt.unsqueeze(0)
        bs = bt.shape

        def dense_bias(score, b, h, qi, ki):
            kn = nat(ki)
            val = bt[b if bs[0] > 1 else 0, h if bs[1] > 1 else 0, qi if bs[2] > 1 else 0,
                     kn.clamp(min=0) if bs[3] > 1 else 0]
            return score + torch.where(kn >= 0, val, 0.0)
        mods.append(dense_bias)
    elif isinstance(bias, IndexedBias):
        tab, ind = bias.table, bias.index
        ht, bi = tab.shape[0], ind.shape[0]

        def idx_bias(score, b, h, qi, ki):
            kn = nat(ki)
            val = tab[h if ht > 1 else 0, ind[b if bi > 1 else 0, qi, kn.clamp(min=0)]]
            return score + torch.where(kn >= 0, val, 0.0)
        mods.append(idx_bias)
    elif isinstance(bias, RelPosBias):
        rh, rw = bias.rel_h, bias.rel_w
        Rh, Rw = rh.shape[-1], rw.shape[-1]
        rb, rhh = rh.shape[0], rh.shape[1]
        if isinstance(lay, WindowLayout):
            sy, sx, ly, lx = _window_geometry(lay, dev)
            gw = lay.w + 2 * lay.halo if lay.border == "zero" else lay.w

            def rel(score, b, h, qi, ki):
                iy = (ki // gw - sy[qi] - ly[qi] + Rh // 2).clamp(0, Rh - 1)
                ix = (ki % gw - sx[qi] - lx[qi] + Rw // 2).clamp(0, Rw - 1)
                bb, hh = (b if rb > 1 else 0), (h if rhh > 1 else 0)
                return score + rh[bb, hh, qi, iy] + rw[bb, hh, qi, ix]
        else:
            qw, kw = bias.q_grid[1], bias.k_grid[1]

            def rel(score, b, h, qi, ki):
                iy = (ki // kw - qi // qw + Rh // 2).clamp(0, Rh - 1)
                ix = (ki % kw - qi % qw + Rw // 2).clamp(0, Rw - 1)
                bb, hh = (b if rb > 1 else 0), (h if rhh > 1 else 0)
                return score + rh[bb, hh, qi, iy] + rw[bb, hh, qi, ix]
        mods.append(rel)

    def score_fn(score, b, h, qi, ki):
        for f in mods:
            score = f(score, b, h, qi, ki)
        return score

    block_mask = None
    if mask_mod is not None:
        bm_b = B if getattr(lay, "batch", None) not in (None, 1) else 1
        bm_h = H if getattr(lay, "heads", None) not in (None, 1) else 1
        if bm_b == 1 and bm_b != B:
            inner = mask_mod
            mask_mod = lambda b, h, qi, ki: inner(b * 0, h, qi, ki)  # noqa: E731
        block_mask = create_block_mask(mask_mod, bm_b, bm_h, Lq, k.shape[2], device=dev, _compile=True)
    out, lse = _flex()(q, k, v, score_mod=score_fn if mods else None, block_mask=block_mask, scale=scale,
                       return_lse=True)
    return out, lse
