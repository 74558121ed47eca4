#!/usr/bin/env python
"""Benchmark the zoo's ops -- zoo.kernels.attention and ms_deform_attn -- against the formulations the
families' upstream code uses and dense SDPA.

    python tools/bench_ops.py --device cpu [--quick]                  # reference path, reduced shapes
    python tools/bench_ops.py --device cuda [--dtype float16]         # Triton, compiled Flex, ...
    python tools/bench_ops.py --ops msda --img 800 1333 --cases encoder decoder

Per workload and implementation: forward and forward+backward time (median and quartiles of ``--reps``
interleaved calls after ``--warmup``, the loop of tools/benchmark.py), peak memory (CUDA
``max_memory_allocated``; CPU the allocator's events) and, for attention, TFLOP/s counted on the kept
(query, key) pairs only (4·D flops per pair forward, x3.5 for forward+backward). Writes JSON
(``{meta, results}``, one row per workload and implementation), a markdown table into
``--card`` (between ``<!-- BENCH:<device> -->`` markers) and a PNG plot.

Attention formulations: timm HaloAttn (pad + unfold + matmul) for halo windows, BiFormer's gather of
the top-k regions for routed attention, padded per-sequence SDPA and a per-sequence loop (PartCrafter's
upstream training path) for packed sequences, dense attention with the mask applied (Sparsifiner's
upstream) for key lists; on CUDA also the lists as an element mask, and lists short enough for the
gather kernel. Deformable attention: the op (on CUDA also its deterministic backward) against the plain
``grid_sample`` formulation, at Focus-DETR shapes (4 levels at strides 8-64 of an HxW image, 8 heads,
4 points, head dim 32; cases: full encoder, Focus-DETR's first encoder layer with the top half of the
tokens as queries, decoder); each row records its largest output / gradient difference from
``grid_sample``, so a fast wrong kernel cannot look good.
"""
import argparse
import datetime
import json
import math
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import zoo.kernels as zk  # noqa: E402
from benchmark import max_abs_diff, measure, peak_memory_mb  # noqa: E402  (the shared loop)

OPS = ("attention", "msda")
WORKLOADS = ("halo", "routed", "varlen", "key_lists")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------
# attention: family formulations (what the upstream code does)
# ------------------------------------------------------------------------------------------------
def halo_unfold(q, k, v, h, w, block, halo, scale, pos_embed=None):
    """timm HaloAttn core: blocked queries, zero-padded unfolded key/value windows, timm's PosEmbedRel
    relative logits, dense softmax."""
    B, H, L, d = q.shape
    dv = v.shape[-1]
    win = block + 2 * halo
    qb = q.view(B, H, h // block, block, w // block, block, d).permute(0, 1, 2, 4, 3, 5, 6)
    qb = qb.reshape(B, H, -1, block * block, d)

    def windows(t):
        c = t.shape[-1]
        m = F.pad(t.view(B, H, h, w, c), (0, 0, halo, halo, halo, halo))
        u = m.unfold(2, win, block).unfold(3, win, block)
        return u.permute(0, 1, 2, 3, 5, 6, 4).reshape(B, H, -1, win * win, c)

    attn = qb @ windows(k).transpose(-1, -2) * scale
    if pos_embed is not None:
        nb = qb.shape[2]
        attn = attn + pos_embed(qb.reshape(B * H, nb, block * block, d)).view(attn.shape)
    o = attn.softmax(-1) @ windows(v)
    return o.view(B, H, h // block, w // block, block, block, dv).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, L, dv)


def routed_gather(q, k, v, topk_index, S, scale):
    """BiFormer KVGather + attention: gathers the k selected regions per query region (k-fold copy)."""
    B, H, L, d = q.shape
    nR, kk = topk_index.shape[-2:]
    idx = topk_index.view(B, 1, nR, kk, 1, 1).expand(B, H, nR, kk, S, d)
    kr = k.view(B, H, 1, nR, S, d).expand(B, H, nR, nR, S, d)
    vr = v.view(B, H, 1, nR, S, v.shape[-1]).expand(B, H, nR, nR, S, v.shape[-1])
    kg = torch.gather(kr, 3, idx).reshape(B, H, nR, kk * S, d)
    vg = torch.gather(vr, 3, idx[..., :1].expand(B, H, nR, kk, S, v.shape[-1])).reshape(B, H, nR, kk * S, -1)
    attn = (q.view(B, H, nR, S, d) * scale) @ kg.transpose(-1, -2)
    return (attn.softmax(-1) @ vg).reshape(B, H, L, -1)


def segments_padded_sdpa(q, k, v, cu):
    """Per-sequence attention by padding the packed sequences into a batch with a key-padding mask."""
    lens = (cu[1:] - cu[:-1]).tolist()
    n, M = len(lens), max(lens)
    tok = torch.full((n, M), -1, dtype=torch.long, device=q.device)
    for i, (a, ln) in enumerate(zip(cu[:-1].tolist(), lens)):
        tok[i, :ln] = torch.arange(a, a + ln, device=q.device)
    valid = tok >= 0

    def pack(t):
        return t[0][:, tok.clamp(min=0)].transpose(0, 1)          # (n, H, M, d)

    o = F.scaled_dot_product_attention(pack(q), pack(k), pack(v), attn_mask=valid[:, None, None, :])
    out = torch.zeros_like(q[0].transpose(0, 1))                    # (L, H, d)
    out[tok[valid]] = o.transpose(1, 2)[valid]
    return out.transpose(0, 1)[None]


def segments_loop(q, k, v, cu):
    """One dense attention call per packed sequence, concatenated (a Python loop over objects)."""
    b = cu.tolist()
    return torch.cat([zk.attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in zip(b[:-1], b[1:])], 2)


def attention_workloads(device, quick, kinds=WORKLOADS):
    """Attention workloads of the given kinds: dicts with the shape, the kept pairs per (batch, head),
    the zoo call (``zoo(q, k, v, backend)``) and the comparison formulations ``[(name, fn(q, k, v))]``."""
    cpu = device == "cpu"
    W = []
    # HaloNet: block 8, halo 3 and 2 (halonet26t/50ts use 8/2 or 8/3)
    if cpu:
        B, H, hw, d = (2, 4, 32, 16) if quick else (8, 8, 32, 16)
    else:
        B, H, hw, d = 32, 8, 64, 64
    from timm.layers.halo_attn import PosEmbedRel
    for halo in (3, 2):
        lay = zk.window_2d(hw, hw, 8, halo)
        pe = PosEmbedRel(8, 8 + 2 * halo, d, d ** -0.5).to(device)

        def zoo_halo(q, k, v, be, lay=lay, pe=pe):
            # the model computes the query-dependent rel logits, the op applies them (rel_to_abs)
            rel = zk.RelPosBias(q @ pe.height_rel.to(q.dtype).t(), q @ pe.width_rel.to(q.dtype).t())
            return zk.attention(q, k, v, lay, bias=rel, backend=be)

        W.append(dict(kind="halo", name=f"halo b8h{halo} {hw}x{hw} +relpos", B=B, H=H, Lq=hw * hw, Lk=hw * hw, D=d,
                      kept=hw * hw * (8 + 2 * halo) ** 2, zoo=zoo_halo,
                      formulations=[("timm HaloAttn (unfold)", lambda q, k, v, lay=lay, halo=halo, pe=pe: halo_unfold(
                          q, k, v, lay.h, lay.w, 8, halo, q.shape[-1] ** -0.5, pe.to(q.dtype)))]))
    # BiFormer: region-major tokens, nR regions of S tokens, top-k regions
    if cpu:
        B, H, nR, S, kk, d = (2, 4, 49, 16, 4, 32) if quick else (8, 4, 49, 16, 4, 32)
    else:
        B, H, nR, S, kk, d = 32, 8, 49, 64, 4, 64
    g = torch.Generator().manual_seed(0)
    topk = torch.stack([torch.randperm(nR, generator=g)[:kk] for _ in range(B * nR)]).view(B, nR, kk).to(device)
    lay = zk.routed_topk(topk, S)
    W.append(dict(kind="routed", name=f"routed {nR}x{S} top{kk}", B=B, H=H, Lq=nR * S, Lk=nR * S, D=d, kept=nR * S * kk * S,
                  zoo=lambda q, k, v, be, lay=lay: zk.attention(q, k, v, lay, scale=0.125, backend=be),
                  formulations=[("BiFormer gather", lambda q, k, v, topk=topk, S=S: routed_gather(q, k, v, topk, S, 0.125))]))
    # packed sequences of different lengths (PartCrafter's objects, DETR groups)
    if cpu:
        lens = [128, 192, 64, 256] if quick else [258, 387, 129, 516, 258, 387, 129, 516]
        H, d = 4, 32
    else:
        lens, H, d = [1024, 1536, 512, 2048] * 4, 16, 128
    cu = torch.tensor([0] + lens, device=device).cumsum(0)
    lay = zk.varlen(cu)
    L = int(cu[-1])
    W.append(dict(kind="varlen", name=f"varlen {len(lens)} seqs, {L} tokens", B=1, H=H, Lq=L, Lk=L, D=d,
                  kept=sum(n * n for n in lens), zoo=lambda q, k, v, be, lay=lay: zk.attention(q, k, v, lay, backend=be),
                  formulations=[("padded SDPA", lambda q, k, v, cu=cu: segments_padded_sdpa(q, k, v, cu)),
                                ("per-sequence loop", lambda q, k, v, cu=cu: segments_loop(q, k, v, cu))]))
    # Sparsifiner: 197 tokens, each non-cls query keeps its top keys (key lists), cls row dense
    B, H, N, d = (2, 6, 197, 64) if (cpu and quick) else ((8, 6, 197, 64) if cpu else (64, 6, 197, 64))
    for keep in ((4,) if cpu else (4, 16)):     # keep 1/4 (the mask kernel on CUDA); 1/16 (the gather kernel)
        K = N // keep if keep == 16 else -(-N // keep)
        idx = torch.rand(B, H, N, N, generator=g).topk(K, -1).indices.to(device)
        lay = zk.key_lists(idx, N, dense_rows=1)
        mask = lay.to_dense_mask()
        forms = [("upstream: dense + mask", lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m))]
        if not cpu:
            as_mask = zk.from_dense_mask(mask)
            forms.append(("zoo triton, lists as mask", lambda q, k, v, m=as_mask: zk.attention(q, k, v, m, backend="triton")))
        W.append(dict(kind="key_lists", name=f"key lists {N} keep {100 * K / N:.0f}%", B=B, H=H, Lq=N, Lk=N, D=d, kept=N + (N - 1) * K,
                      zoo=lambda q, k, v, be, lay=lay: zk.attention(q, k, v, lay, backend=be), formulations=forms))
    return [w for w in W if w["kind"] in kinds]


def _timed_rows(base: dict, impls, make_args, device, reps, warmup, flops=None, check=None):
    """Rows for one workload: every implementation's forward and forward+backward timed interleaved
    with the others, then its peak memory. ``make_args()`` -> fresh leaf inputs; ``impls`` (name, fn);
    ``flops(name)`` -> forward flops or None; ``check(name, outputs)`` -> extra row fields."""
    args = make_args()
    leaves = [t.detach().requires_grad_(True) for t in args if t.is_floating_point()]
    grads_in = {}
    rows, fwd, fwdbwd, outputs = {}, {}, {}, {}
    for name, fn in impls:
        row = dict(base, impl=name)
        rows[name] = row

        def run_fwd(fn=fn):
            with torch.no_grad():
                return fn(*args)

        def run_fwdbwd(fn=fn):
            it = iter(leaves)
            call = [next(it) if t.is_floating_point() else t for t in args]
            out = fn(*call)
            go = grads_in.setdefault(tuple(out.shape), torch.randn_like(out))
            return torch.autograd.grad(out, leaves, go, allow_unused=True)

        try:
            out = run_fwd()
            outputs[name] = [out.float()] + [None if gr is None else gr.float() for gr in run_fwdbwd()]
        except Exception as e:  # record and continue: a comparison path may not support a shape
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        fwd[name], fwdbwd[name] = run_fwd, run_fwdbwd
    t_f = measure(fwd, device, warmup, reps) if fwd else {}
    t_fb = measure(fwdbwd, device, warmup, reps) if fwdbwd else {}
    for name in fwd:
        row, a, b = rows[name], t_f[name], t_fb[name]
        row.update(fwd_ms=round(a.median * 1e3, 3), fwdbwd_ms=round(b.median * 1e3, 3),
                   fwd_ms_iqr=[round(a.q1 * 1e3, 3), round(a.q3 * 1e3, 3)],
                   fwdbwd_ms_iqr=[round(b.q1 * 1e3, 3), round(b.q3 * 1e3, 3)])
        fl = flops(name) if flops else None
        if fl:
            row.update(fwd_tflops=float(f"{fl / a.median / 1e12:.4g}"), fwdbwd_tflops=float(f"{3.5 * fl / b.median / 1e12:.4g}"))
        row.update(peak_mib_fwd=round(peak_memory_mb(fwd[name], device), 1),
                   peak_mib_fwdbwd=round(peak_memory_mb(fwdbwd[name], device), 1))
        if check:
            row.update(check(name, outputs))
    return list(rows.values())


def run_attention(device, dtype, quick, reps, warmup, backends, kinds=WORKLOADS):
    results = []
    for wl in attention_workloads(device, quick, kinds):
        B, H, Lq, Lk, D = wl["B"], wl["H"], wl["Lq"], wl["Lk"], wl["D"]
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for L in (Lq, Lk, Lk))
        impls = [(f"zoo {be}", lambda q, k, v, be=be, f=wl["zoo"]: f(q, k, v, be)) for be in backends]
        impls += wl["formulations"]
        impls.append(("dense SDPA", lambda q, k, v: F.scaled_dot_product_attention(q, k, v)))
        base = dict(op="attention", workload=wl["name"], B=B, H=H, Lq=Lq, Lk=Lk, D=D, kept_pairs=wl["kept"] * B * H)
        kept_fl, dense_fl = 4.0 * B * H * wl["kept"] * D, 4.0 * B * H * Lq * Lk * D
        rows = _timed_rows(base, impls, lambda: (q, k, v), device, reps, warmup,
                           flops=lambda name: dense_fl if name == "dense SDPA" else kept_fl)
        for r in rows:
            print(json.dumps(r), flush=True)
        results += rows
    return results


# ------------------------------------------------------------------------------------------------
# multi-scale deformable attention
# ------------------------------------------------------------------------------------------------
def level_shapes(height, width, strides=(8, 16, 32, 64)):
    """Feature map sizes of a stride-s pyramid (ceil, as stride-2 convs with padding give)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def msda_inputs(shapes, batch, queries, heads, points, dim, dtype, device, seed=0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights): locations
    scattered a few pixels around a reference point per query, some beyond the map."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    hw = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    S, L = int(hw.sum()), len(shapes)
    value = torch.randn(batch, S, heads, dim, generator=g)
    ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g)
    loc = ref + 0.05 * torch.randn(batch, queries, heads, L, points, 2, generator=g)
    attn = torch.randn(batch, queries, heads, L * points, generator=g).softmax(-1).view(batch, queries, heads, L, points)
    to = dict(device=device, dtype=dtype)
    return value.to(**to), spatial.to(device), starts.to(device), loc.to(**to), attn.to(**to)


def msda_grid_sample(value, shapes, loc, attn):
    """Deformable attention written with one ``grid_sample`` per level over all queries and points:
    sample every level's map at the points, weight, sum over levels and points."""
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    sizes = [h * w for h, w in shapes]
    grids = 2 * loc - 1                                                       # [0, 1] -> [-1, 1]
    sampled = []
    for lvl, (v, (h, w)) in enumerate(zip(value.split(sizes, 1), shapes)):
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        gr = grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(v, gr, mode="bilinear", padding_mode="zeros", align_corners=False))
    s = torch.stack(sampled, -2).flatten(-2)                                  # (N*M, D, Lq, L*P)
    a = attn.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    return (s * a).sum(-1).view(N, M, D, Lq).permute(0, 3, 1, 2).reshape(N, Lq, M * D)


def run_msda(device, dtype, reps, warmup, img, batch, dec_q, heads, points, dim, cases, deterministic):
    shapes = level_shapes(*img)
    tokens = sum(h * w for h, w in shapes)
    queries = dict(encoder=tokens, encoder_focus=tokens // 2 + 1, decoder=dec_q)
    results = []
    for case in cases:
        nq = queries[case]
        value, spatial, starts, loc, attn = msda_inputs(shapes, batch, nq, heads, points, dim, dtype, device)
        impls = [("zoo", lambda v, l, a: zk.ms_deform_attn(v, spatial, starts, l, a))]
        if device == "cuda" and deterministic:
            impls.append(("zoo deterministic", lambda v, l, a: zk.ms_deform_attn(v, spatial, starts, l, a,
                                                                               deterministic=True)))
        impls.append(("grid_sample", lambda v, l, a: msda_grid_sample(v, shapes, l, a)))
        base = dict(op="ms_deform_attn", workload=f"msda {case} {nq} queries", B=batch, H=heads, Lq=nq, Lk=tokens,
                    D=dim, levels=[list(s) for s in shapes], points=points)

        def check(name, outs):
            if name == "grid_sample" or "grid_sample" not in outs or name not in outs:
                return {}
            keys = ("out", "grad_value", "grad_loc", "grad_attn")
            return dict(max_abs_diff={k: max_abs_diff(x, y) for k, x, y in zip(keys, outs[name], outs["grid_sample"])
                                      if x is not None and y is not None})

        rows = _timed_rows(base, impls, lambda: (value, loc, attn), device, reps, warmup, check=check)
        for r in rows:
            print(json.dumps(r), flush=True)
        results += rows
    return results


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def markdown(results, header):
    lines = [header, "", "| workload | impl | fwd ms | fwd+bwd ms | TFLOP/s fwd (kept) | TFLOP/s fwd+bwd (kept) |"
             " peak MiB fwd+bwd | fwd+bwd speed-up vs zoo |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    zoo_t = {}
    for r in results:
        if r["impl"].startswith("zoo") and "fwdbwd_ms" in r and r["workload"] not in zoo_t:
            zoo_t[r["workload"]] = r["fwdbwd_ms"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['impl']} | error | {r['error'][:60]} | | | | |")
            continue
        sp = zoo_t.get(r["workload"])
        rel = f"{r['fwdbwd_ms'] / sp:.2f}×" if sp else ""
        lines.append(f"| {r['workload']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
                     f"{_f(r.get('fwd_tflops'), '.3g')} | {_f(r.get('fwdbwd_tflops'), '.3g')} | "
                     f"{_f(r.get('peak_mib_fwdbwd'), '.0f')} | {rel} |")
    lines.append("")
    lines.append("Times are medians of interleaved calls. TFLOP/s count only the kept (query, key) pairs (dense "
                 "SDPA: all pairs; none for deformable attention). The last column is that row's fwd+bwd time "
                 "divided by the zoo row's (>1 means the zoo op is faster).")
    return "\n".join(lines)


def write_card(path, tag, text):
    path = Path(path)
    body = path.read_text() if path.exists() else "# zoo.kernels benchmarks\n"
    start, end = f"<!-- BENCH:{tag} -->", f"<!-- /BENCH:{tag} -->"
    block = f"{start}\n{text}\n{end}"
    if start in body:
        body = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m: block, body, flags=re.S)
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.write_text(body)


def plot(results, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print("no plot:", e, file=sys.stderr)
        return
    wls = list(dict.fromkeys(r["workload"] for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, ax = plt.subplots(figsize=(2.2 * len(wls) + 2, 4))
    wdt = 0.8 / len(impls)
    for j, im in enumerate(impls):
        ys = [next((r.get("fwdbwd_ms", 0) for r in results if r["workload"] == w and r["impl"] == im), 0) for w in wls]
        ax.bar([i + j * wdt for i in range(len(wls))], ys, wdt, label=im)
    ax.set_xticks([i + 0.4 - wdt / 2 for i in range(len(wls))])
    ax.set_xticklabels(wls, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("fwd+bwd ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="which ops (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="smaller attention shapes (CPU smoke run)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                   help="attention workloads to run (default: all)")
    p.add_argument("--reps", "--repeats", dest="reps", type=int, default=None,
                   help="timed calls per implementation (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--json", "--out", dest="json", default=None,
                   help="where to write the JSON results (default model_cards/kernels_bench_<device>.json)")
    p.add_argument("--card", default=str(REPO / "model_cards" / "kernels.md"))
    p.add_argument("--no-card", action="store_true")
    p.add_argument("--plot", default=None, help="PNG path (default model_cards/kernels_bench_<device>.png)")
    g = p.add_argument_group("deformable attention (--ops msda)")
    g.add_argument("--img", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image size (default 800 1333 on CUDA, 320 320 on CPU)")
    g.add_argument("--batch", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    g.add_argument("--decoder-queries", type=int, default=None, help="default 900 (CUDA) / 300 (CPU)")
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--points", type=int, default=4)
    g.add_argument("--dim", type=int, default=32, help="head dim")
    g.add_argument("--cases", nargs="+", default=["encoder", "encoder_focus", "decoder"],
                   choices=["encoder", "encoder_focus", "decoder"])
    g.add_argument("--skip-deterministic", action="store_true", help="CUDA: skip the deterministic-backward row")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    for n in ("reps", "batch", "decoder_queries", "heads", "points", "dim"):
        if getattr(a, n) is not None and getattr(a, n) < 1:
            p.error(f"--{n.replace('_', '-')} must be >= 1, got {getattr(a, n)}")
    if a.warmup is not None and a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.img is not None and min(a.img) < 64:
        p.error(f"--img H W must be >= 64 each (4 levels down to stride 64), got {a.img}")
    return a


def main(argv=None):
    a = parse_args(argv)
    dev = a.device
    cuda = dev == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if cuda else torch.float32)
    reps = a.reps or (20 if cuda else 3)
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 1)
    results = []
    if "attention" in a.ops:
        results += run_attention(dev, dtype, a.quick, reps, warmup, ["triton", "flex"] if cuda else ["reference"],
                                 a.workloads)
    msda_meta = None
    if "msda" in a.ops:
        img = a.img or ((800, 1333) if cuda else (320, 320))
        batch = a.batch or (2 if cuda else 1)
        dec_q = a.decoder_queries or (900 if cuda else 300)
        results += run_msda(dev, dtype, reps, warmup, img, batch, dec_q, a.heads, a.points, a.dim, a.cases,
                            not a.skip_deterministic)
        msda_meta = dict(image=list(img), batch=batch, decoder_queries=dec_q, heads=a.heads, points=a.points, dim=a.dim)
    dname = torch.cuda.get_device_name() if cuda else \
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    meta = dict(tool="tools/bench_ops.py", ops=a.ops, device=dname, dtype=str(dtype).replace("torch.", ""),
                date=datetime.date.today().isoformat(), torch=torch.__version__, quick=a.quick, reps=reps,
                warmup=warmup, msda=msda_meta)
    jpath = Path(a.json or REPO / "model_cards" / f"kernels_bench_{dev}.json")
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    header = (f"Measured {meta['date']} on {dname}, {meta['dtype']}, torch {meta['torch']}, median of {reps} "
              f"calls{' (reduced shapes)' if a.quick or not cuda else ''}.")
    text = markdown(results, header)
    if not a.no_card:
        write_card(a.card, dev, text)
    plot(results, a.plot or REPO / "model_cards" / f"kernels_bench_{dev}.png", header)
    print(text)
    return dict(meta=meta, results=results)


if __name__ == "__main__":
    main()
