"""Benchmark the zoo's BiFormer against the official implementation (CPU).

    python tools/bench_biformer.py /path/to/rayleizhu/BiFormer [--batch 16] [--img 224] [--rounds 5]

The official code is imported from the given checkout at run time (never vendored); it needs
``einops`` (``pip install einops``); its optional ``fairscale`` import is replaced by a no-op
stand-in if fairscale is absent. Two measurements, printed and written as JSON (``--out``):

1. Throughput (img/s, inference) of ``biformer_tiny`` vs the official model with the same
   weights (outputs checked equal first). Rounds alternate zoo/official (A/B/A/B) and medians
   are reported, because the machine may be shared.
2. Peak memory of one BRA layer, zoo (routed layout) vs the official gather formulation, at a
   56x56 map with top-k 4, forward+backward and inference. Peak = rise of the process's peak RSS
   (VmHWM, reset through /proc/self/clear_refs) over the RSS before the call; Linux only.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings

import torch


def load_official(path):
    """Import the official models from a checkout; returns (models.biformer, ops.bra_legacy)."""
    if not os.path.isfile(os.path.join(path, "models", "biformer.py")):
        raise SystemExit(f"{path!r} is not a BiFormer checkout (models/biformer.py not found)")
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("the official BiFormer code needs einops: pip install einops")
    if "fairscale" not in sys.modules:
        try:
            import fairscale  # noqa: F401
        except ImportError:  # only checkpoint_wrapper is imported, and unused by default
            fs, fs_nn, fs_ck = (types.ModuleType(n) for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"))
            fs_ck.checkpoint_wrapper = lambda m, *a, **k: m
            fs.nn, fs_nn.checkpoint = fs_nn, fs_ck
            sys.modules.update({"fairscale": fs, "fairscale.nn": fs_nn, "fairscale.nn.checkpoint": fs_ck})
    sys.path.insert(0, os.path.abspath(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import models.biformer as official  # the official file registers biformer_* with timm
        import ops.bra_legacy as official_bra
    sys.path.pop(0)
    return official, official_bra


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_mib(fn):
    """Peak RSS rise (MiB) while running fn()."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - base) / 1024


def throughput(official, batch, img, rounds, iters):
    import zoo  # noqa: F401  (imported after the official file so zoo's registrations win)
    from zoo.models.biformer import biformer_tiny, checkpoint_filter_fn
    torch.manual_seed(0)
    ref = official.biformer_tiny().eval()
    ours = biformer_tiny().eval()
    ours.load_state_dict(checkpoint_filter_fn({"model": ref.state_dict()}, ours), strict=True)
    x = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        diff = (ours(x[:2]) - ref(x[:2])).abs().max().item()
        res = {"zoo": [], "official": []}
        for m in (ours, ref):  # warm-up
            m(x)
        for _ in range(rounds):
            for name, m in (("zoo", ours), ("official", ref)):
                t0 = time.perf_counter()
                for _ in range(iters):
                    m(x)
                res[name].append(batch * iters / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in res.items()}
    return dict(batch=batch, img=img, max_abs_diff_logits=diff, img_per_s_rounds=res, img_per_s_median=med,
                speedup=med["zoo"] / med["official"])


def bra_memory(official_bra, batch, size, topk, dim, heads):
    from zoo.layers.routing_attention import BiLevelRoutingAttention
    torch.manual_seed(0)
    ref = official_bra.BiLevelRoutingAttention(dim, num_heads=heads, n_win=7, qk_dim=dim, topk=topk,
                                               kv_downsample_mode="identity", side_dwconv=5)
    ours = BiLevelRoutingAttention(dim, num_heads=heads, n_win=7, topk=topk)
    sd = {k.replace("qkv.qkv.", "qkv.").replace("wo.", "proj."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(batch, size, size, dim)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    out = dict(batch=batch, map=size, topk=topk, dim=dim, heads=heads, max_abs_diff=diff)

    def train(m):
        xi = x.clone().requires_grad_()
        m(xi).sum().backward()

    def infer(m):
        with torch.no_grad():
            m(x)

    for mode, fn in (("fwd_bwd", train), ("inference", infer)):
        vals = {"zoo": [], "official": []}
        for _ in range(2):
            for name, m in (("zoo", ours), ("official", ref)):
                vals[name].append(peak_mib(lambda: fn(m)))
        z, o = min(vals["zoo"]), min(vals["official"])
        out[mode] = dict(zoo_peak_mib=round(z, 1), official_peak_mib=round(o, 1), ratio=round(z / o, 3))
    return out


def main():
    # A fixed mmap threshold makes glibc return every large tensor to the OS when freed, so the
    # peak RSS rise measures what a call really holds (glibc's adaptive threshold would recycle
    # freed heap memory and hide the second measurement's peak).
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("official_path", help="path of a rayleizhu/BiFormer checkout (work tree)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-batch", type=int, default=16)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    official, official_bra = load_official(args.official_path)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=f"CPU, {args.threads} threads",
               cpu=platform.processor() or platform.machine(), torch=torch.__version__)
    res["bra_memory"] = bra_memory(official_bra, args.mem_batch, 56, 4, 64, 2)
    print(json.dumps(res["bra_memory"], indent=1), flush=True)
    if not args.skip_speed:
        res["throughput"] = throughput(official, args.batch, args.img, args.rounds, args.iters)
        print(json.dumps(res["throughput"], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
