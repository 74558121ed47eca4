#!/usr/bin/env python
"""Benchmark zoo.kernels.attention against each family's own formulation and dense SDPA.

    python tools/bench_kernels.py --device cpu  [--quick]          # reference path, reduced shapes
    python tools/bench_kernels.py --device cuda [--dtype float16]  # Triton, compiled Flex, ...

Per workload and implementation: forward and forward+backward time, TFLOP/s counted on the kept
(query, key) pairs only (4·D flops per pair forward, ×3.5 for forward+backward), and peak memory
(CUDA only). Writes JSON, a markdown table into model_cards/kernels.md (between BENCH markers) and a
PNG plot. Formulations: timm HaloAttn (pad + unfold + matmul) for halo windows, BiFormer KVGather
(torch.gather of the top-k regions + matmul) for routed attention, padded per-sequence SDPA for
segments, dense attention with the mask applied (what Sparsifiner's upstream does) for key lists
(on CUDA also the gather kernel and the element-mask kernel, each forced).
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zoo.kernels as zk  # noqa: E402
from zoo.kernels import keylist_triton  # noqa: E402


# ------------------------------------------------------------------------------------------------
# family formulations (what the upstream code does)
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
    H, d = q.shape[1], q.shape[-1]
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


# ------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------
def workloads(device, quick):
    cpu = device == "cpu"
    W = []
    # HaloNet: block 8, halo 3 (halonet26t/50ts use 8/2 or 8/3)
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

        W.append(dict(name=f"halo b8h{halo} {hw}x{hw} +relpos", B=B, H=H, Lq=hw * hw, Lk=hw * hw, D=d,
                      kept=hw * hw * (8 + 2 * halo) ** 2, layout=lay, kwargs={}, zoo=zoo_halo, pe=pe,
                      formulation=("timm HaloAttn (unfold)", lambda q, k, v, lay=lay, halo=halo, pe=pe: halo_unfold(
                          q, k, v, lay.h, lay.w, 8, halo, q.shape[-1] ** -0.5, pe.to(q.dtype)))))
    # BiFormer: region-major tokens, nR regions of S tokens, top-k regions
    if cpu:
        B, H, nR, S, kk, d = (2, 4, 49, 16, 4, 32) if quick else (8, 4, 49, 16, 4, 32)
    else:
        B, H, nR, S, kk, d = 32, 8, 49, 64, 4, 64
    g = torch.Generator().manual_seed(0)
    topk = torch.stack([torch.randperm(nR, generator=g)[:kk] for _ in range(B * nR)]).view(B, nR, kk).to(device)
    lay = zk.routed_topk(topk, S)
    W.append(dict(name=f"routed {nR}x{S} top{kk}", B=B, H=H, Lq=nR * S, Lk=nR * S, D=d, kept=nR * S * kk * S,
                  layout=lay, kwargs=dict(scale=0.125),
                  formulation=("BiFormer gather", lambda q, k, v, topk=topk, S=S: routed_gather(q, k, v, topk, S, 0.125))))
    # packed sequences (PartCrafter / DETR groups)
    if cpu:
        n, ln, H, d = (4, 128, 4, 32) if quick else (8, 256, 4, 32)
    else:
        n, ln, H, d = 16, 1024, 16, 128
    cu = torch.arange(0, n * ln + 1, ln, device=device)
    lay = zk.varlen(cu)
    W.append(dict(name=f"varlen {n}x{ln}", B=1, H=H, Lq=n * ln, Lk=n * ln, D=d, kept=n * ln * ln, layout=lay,
                  kwargs={}, formulation=("padded SDPA", lambda q, k, v, cu=cu: segments_padded_sdpa(q, k, v, cu))))
    # Sparsifiner: 197 tokens, each non-cls query keeps its top 25 % keys (key lists), cls row dense
    B, H, N, d = (2, 6, 197, 64) if (cpu and quick) else ((8, 6, 197, 64) if cpu else (64, 6, 197, 64))
    K = -(-N // 4)
    idx = torch.rand(B, H, N, N, generator=g).topk(K, -1).indices.to(device)
    lay = zk.key_lists(idx, N, dense_rows=1)
    mask = lay.to_dense_mask()
    as_mask = zk.from_dense_mask(mask)
    W.append(dict(name=f"key lists {N} keep 25%", B=B, H=H, Lq=N, Lk=N, D=d, kept=N + (N - 1) * K, layout=lay,
                  kwargs={}, formulation=("upstream: dense + mask", lambda q, k, v, m=mask: F.scaled_dot_product_attention(
                      q, k, v, attn_mask=m)),
                  # on CUDA "zoo triton" follows the dispatch (25 % lists: the element mask); both paths forced:
                  extra=[] if cpu else [
                      ("zoo triton, gather kernel", lambda q, k, v, lay=lay: keylist_triton.keylist_attention(
                          q, k, v, lay, q.shape[-1] ** -0.5)[0]),
                      ("zoo triton, lists as mask", lambda q, k, v, m=as_mask: zk.attention(q, k, v, m, backend="triton"))]))
    return W


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device == "cuda" else None
    return ts[len(ts) // 2] * 1e3, peak


def run(device, dtype, quick, reps, backends):
    results = []
    for wl in workloads(device, quick):
        B, H, Lq, Lk, D = wl["B"], wl["H"], wl["Lq"], wl["Lk"], wl["D"]
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for L in (Lq, Lk, Lk))
        flops_fwd = 4.0 * B * H * wl["kept"] * D
        impls = []
        for be in backends:
            if "zoo" in wl:
                impls.append((f"zoo {be}", lambda q, k, v, be=be, f=wl["zoo"]: f(q, k, v, be)))
            else:
                impls.append((f"zoo {be}", lambda q, k, v, be=be: zk.attention(q, k, v, wl["layout"], backend=be,
                                                                               **wl["kwargs"])))
        impls += wl.get("extra", [])
        impls.append(wl["formulation"])
        impls.append(("dense SDPA", lambda q, k, v: F.scaled_dot_product_attention(q, k, v)))
        for name, fn in impls:
            row = dict(workload=wl["name"], impl=name, B=B, H=H, Lq=Lq, Lk=Lk, D=D, kept_pairs=wl["kept"] * B * H)
            try:
                with torch.no_grad():
                    t_f, m_f = time_fn(lambda: fn(q, k, v), device, reps)
                qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                go = torch.randn(B, H, Lq, D, device=device, dtype=dtype)

                def fb():
                    o = fn(qg, kg, vg)
                    torch.autograd.grad(o, (qg, kg, vg), go)
                t_fb, m_fb = time_fn(fb, device, reps)
                dense = name == "dense SDPA"
                fl = 4.0 * B * H * Lq * Lk * D if dense else flops_fwd
                row.update(fwd_ms=round(t_f, 3), fwdbwd_ms=round(t_fb, 3),
                           fwd_tflops=float(f"{fl / t_f / 1e9:.4g}"), fwdbwd_tflops=float(f"{3.5 * fl / t_fb / 1e9:.4g}"),
                           peak_mib_fwd=None if m_f is None else round(m_f, 1),
                           peak_mib_fwdbwd=None if m_fb is None else round(m_fb, 1))
            except Exception as e:  # record and continue: a comparison path may not support a shape
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


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
        mem = "" if r["peak_mib_fwdbwd"] is None else f"{r['peak_mib_fwdbwd']:.0f}"
        lines.append(f"| {r['workload']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
                     f"{r['fwd_tflops']:.3g} | {r['fwdbwd_tflops']:.3g} | {mem} | {rel} |")
    lines.append("")
    lines.append("TFLOP/s count only the kept (query, key) pairs (dense SDPA: all pairs). The last column is "
                 "that row's fwd+bwd time divided by the zoo row's (>1 means the zoo op is faster).")
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
    except Exception as e:  # pragma: no cover
        print("no plot:", e)
        return
    wls = list(dict.fromkeys(r["workload"] for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, ax = plt.subplots(figsize=(2.2 * len(wls) + 2, 4))
    wdt = 0.8 / len(impls)
    for j, im in enumerate(impls):
        ys = [next((r.get("fwdbwd_ms", 0) for r in results if r["workload"] == w and r["impl"] == im), 0) for w in wls]
        ax.bar([i + j * wdt for i in range(len(wls))], ys, wdt, label=im)
    ax.set_xticks([i + 0.4 - wdt / 2 for i in range(len(wls))])
    ax.set_xticklabels(wls, fontsize=8)
    ax.set_ylabel("fwd+bwd ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="smaller shapes (CPU smoke run)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--json", default=None, help="where to write the JSON results")
    p.add_argument("--card", default=str(REPO / "model_cards" / "kernels.md"))
    p.add_argument("--no-card", action="store_true")
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    dev = a.device
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if dev == "cuda" else torch.float32)
    reps = a.reps or (20 if dev == "cuda" else 3)
    backends = ["triton", "flex"] if dev == "cuda" else ["reference"]
    results = run(dev, dtype, a.quick, reps, backends)
    if dev == "cuda":
        dname = torch.cuda.get_device_name()
    else:
        dname = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    meta = dict(device=dname, dtype=str(dtype).replace("torch.", ""), date=datetime.date.today().isoformat(),
                torch=torch.__version__, quick=a.quick, reps=reps)
    jpath = a.json or str(REPO / "model_cards" / f"kernels_bench_{dev}.json")
    Path(jpath).parent.mkdir(parents=True, exist_ok=True)
    Path(jpath).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    header = (f"Measured {meta['date']} on {dname}, {meta['dtype']}, torch {meta['torch']}, median of {reps} "
              f"runs{' (reduced shapes)' if a.quick or dev == 'cpu' else ''}.")
    if not a.no_card:
        write_card(a.card, dev, markdown(results, header))
    plot(results, a.plot or str(REPO / "model_cards" / f"kernels_bench_{dev}.png"), header)
    print(markdown(results, header))


if __name__ == "__main__":
    main()
