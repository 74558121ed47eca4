#!/usr/bin/env python
"""Benchmark zoo.kernels.ms_deform_attn against the plain grid_sample formulation.

Shapes follow Focus-DETR: 4 levels at strides 8/16/32/64 of an H×W image (800×1333 → 22,223
tokens), 8 heads, 4 points, head dim 32. Cases: the full encoder (queries = all tokens), Focus-DETR's
first encoder layer (queries = the top half of the tokens, gathered) and the decoder (900 queries).

    python tools/bench_msda.py --device cuda --out bench_msda_cuda.json
    python tools/bench_msda.py --device cpu --out bench_msda_cpu.json   # reduced shapes
    python tools/bench_msda.py --compile-only 90   # no GPU needed: build the kernels for sm_90

CUDA times use CUDA events (median over repeats) and report peak allocated memory per call; CPU times
use perf_counter, and ``--cpu-rss`` (Linux) adds the peak RSS growth during one forward+backward,
each measured in a fresh child process. Each case also records the largest output / gradient difference between the two
implementations, so a fast wrong kernel cannot look good.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

if "--compile-only" in sys.argv:  # compiled (not interpreted) kernels are needed for ahead-of-time builds
    os.environ.pop("TRITON_INTERPRET", None)

import torch


def _load_msda():
    """zoo.kernels.msda, or -- if the package (which imports every model family) cannot be
    imported -- kernels/msda.py loaded straight from this checkout as a bare package."""
    try:
        from zoo.kernels import msda
        return msda
    except Exception as e:  # noqa: BLE001 - any model file failing to import must not stop a kernel bench
        import importlib
        import types
        print(f"note: `import zoo` failed ({type(e).__name__}: {e}); loading kernels/ directly",
              file=sys.stderr)
        pkg = types.ModuleType("_bench_kernels")
        pkg.__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")]
        sys.modules["_bench_kernels"] = pkg
        return importlib.import_module("_bench_kernels.msda")


_msda = _load_msda()
ms_deform_attn, ms_deform_attn_grid_sample = _msda.ms_deform_attn, _msda.ms_deform_attn_grid_sample


def level_shapes(height, width, strides=(8, 16, 32, 64)):
    """Feature map sizes of a stride-s pyramid (ceil, as stride-2 convs with padding give)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def make_inputs(shapes, batch, queries, heads, points, dim, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    hw = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    S, L = int(hw.sum()), len(shapes)
    value = torch.randn(batch, S, heads, dim, generator=g)
    # locations around a reference point, a few pixels of spread, some beyond the map
    ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g)
    loc = ref + 0.05 * torch.randn(batch, queries, heads, L, points, 2, generator=g)
    attn = torch.randn(batch, queries, heads, L * points, generator=g).softmax(-1)
    attn = attn.view(batch, queries, heads, L, points)
    to = dict(device=device, dtype=dtype)
    return value.to(**to), spatial.to(device), starts.to(device), loc.to(**to), attn.to(**to)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup, repeats):
    """Median seconds per call, and peak extra memory (CUDA only, bytes)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_probe(argv):
    """Child process: build one case, run forward+backward once, print peak RSS during the call
    minus RSS before it (bytes). Linux: the high-water mark is reset through /proc/self/clear_refs."""
    shapes, batch, queries, heads, points, dim, dtype, impl = json.loads(argv)
    value, spatial, starts, loc, attn = make_inputs([tuple(s) for s in shapes], batch, queries, heads,
                                                    points, dim, getattr(torch, dtype), torch.device("cpu"))
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    grad_out = torch.randn(batch, queries, heads * dim, dtype=value.dtype)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    if impl == "ours":
        out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2])
    else:
        out = ms_deform_attn_grid_sample(leaves[0], spatial, leaves[1], leaves[2])
    out.backward(grad_out)
    print(json.dumps((_status_kib("VmHWM") - before) * 1024))


def cpu_rss(shapes, batch, queries, args, impl):
    spec = json.dumps([shapes, batch, queries, args.heads, args.points, args.dim, args.dtype, impl])
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-probe", spec],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return None
    return int(res.stdout.strip().splitlines()[-1])


def bench_case(name, shapes, batch, queries, args, device, dtype):
    value, spatial, starts, loc, attn = make_inputs(shapes, batch, queries, args.heads, args.points,
                                                    args.dim, dtype, device)
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    grad_out = torch.randn(batch, queries, args.heads * args.dim, device=device, dtype=dtype)

    impls = {
        "ours": lambda v, l, a: ms_deform_attn(v, spatial, starts, l, a),
        "grid_sample": lambda v, l, a: ms_deform_attn_grid_sample(v, spatial, l, a),
    }
    if device.type == "cuda" and not args.skip_deterministic:
        impls["ours_deterministic"] = lambda v, l, a: ms_deform_attn(v, spatial, starts, l, a,
                                                                     deterministic=True)
    result = dict(case=name, batch=batch, queries=queries, tokens=int(value.shape[1]), levels=shapes)
    outputs = {}
    for impl, fn in impls.items():
        def fwd():
            with torch.no_grad():
                return fn(value, loc, attn)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad_out)

        entry = {}
        try:
            entry["fwd_s"], entry["fwd_peak_bytes"] = time_fn(fwd, device, args.warmup, args.repeats)
            entry["fwd_bwd_s"], entry["fwd_bwd_peak_bytes"] = time_fn(fwd_bwd, device, args.warmup,
                                                                      args.repeats)
            fwd_bwd()
            outputs[impl] = [fwd().float()] + [t.grad.float() for t in leaves]
        except torch.OutOfMemoryError as e:  # the un-chunked formulation may not fit
            entry["error"] = f"out of memory: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
        if args.cpu_rss and device.type == "cpu" and impl in ("ours", "grid_sample"):
            entry["fwd_bwd_peak_rss_growth_bytes"] = cpu_rss(shapes, batch, queries, args, impl)
        result[impl] = entry
        print(f"  {name:14s} {impl:20s} " + "  ".join(
            f"{k}={v * 1e3:.2f}ms" if k.endswith("_s") else f"{k}={v}" for k, v in entry.items()
            if v is not None and not k.endswith("bytes")) + "".join(
            f"  {k}={v / 2**20:.0f}MiB" for k, v in entry.items() if k.endswith("bytes") and v),
            flush=True)
    base = result.get("grid_sample", {})
    for impl in impls:
        if impl != "grid_sample" and "fwd_s" in result[impl] and "fwd_s" in base:
            result[impl]["speedup_fwd"] = base["fwd_s"] / result[impl]["fwd_s"]
            result[impl]["speedup_fwd_bwd"] = base["fwd_bwd_s"] / result[impl]["fwd_bwd_s"]
        if impl != "grid_sample" and impl in outputs and "grid_sample" in outputs:
            result[impl]["max_abs_diff"] = {
                k: (x - y).abs().max().item()
                for k, x, y in zip(("out", "grad_value", "grad_loc", "grad_attn"),
                                   outputs[impl], outputs["grid_sample"])}
    return result


def compile_only(arch):
    """Compile every kernel variant for CUDA sm_<arch> without a GPU (triton + its bundled ptxas) and
    print register / spill use: catches compile errors and register blow-ups on a CPU-only machine."""
    import subprocess as sp
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tk = sys.modules[_msda.__name__.rsplit(".", 1)[0] + ".msda_triton"]
    target = GPUTarget("cuda", int(arch), 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    failures = 0

    def build(fn, sig, consts, warps=4):
        nonlocal failures
        full = {name: ("constexpr" if name in consts else sig[name]) for name in fn.arg_names}
        tag = f"{fn.__name__} {sig.get('value_ptr', sig.get('gout_ptr'))} " + " ".join(
            f"{k}={v}" for k, v in consts.items() if k not in ("L", "P"))
        try:
            kernel = triton.compile(ASTSource(fn, full, constexprs=consts), target=target,
                                    options={"num_warps": warps})
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures += 1
            print(f"FAIL {tag}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        usage = ""
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                out = sp.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
                usage = " ".join(l.strip().split(" SHARED")[0] for l in out.splitlines() if "REG:" in l)
        print(f"ok   {tag}  {usage}")

    for dt in ("fp32", "fp16", "bf16"):
        common = dict(value_ptr=f"*{dt}", shapes_ptr="*i64", starts_ptr="*i64", loc_ptr=f"*{dt}",
                      attn_ptr=f"*{dt}", S="i32", Lq="i32", M="i32", D="i32")
        for border in (False, True):
            for align in (False, True):
                bq, bk, bd, warps = tk._tile(4, 4, 32, tk.FWD_TILE)
                build(tk.msda_fwd_kernel, dict(common, out_ptr=f"*{dt}"),
                      dict(L=4, P=4, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd, BORDER=border, ALIGN=align), warps)
                for scatter in (True, False):
                    for idx64 in (False, True):
                        build(tk.msda_bwd_kernel,
                              dict(common, gout_ptr=f"*{dt}", gvalue_ptr="*fp32", gloc_ptr="*fp32",
                                   gattn_ptr="*fp32", total="i64" if idx64 else "i32"),
                              dict(L=4, P=4, BLOCK_S=tk.BWD_TILE // 32, BLOCK_D=32, BORDER=border,
                                   ALIGN=align, SCATTER_VALUE=scatter, IDX64=idx64))
        build(tk.msda_grad_value_gather_kernel,
              dict(offsets_ptr="*i64", src_ptr="*i64", weight_ptr="*fp32", gout_ptr=f"*{dt}",
                   gvalue_ptr="*fp32", R="i32", D="i32"), dict(BLOCK_R=16, BLOCK_E=8, BLOCK_D=32))
    print(f"{failures} failures (sm_{arch}, triton {triton.__version__})")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image size (default 800 1333 on CUDA, 320 320 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    p.add_argument("--decoder-queries", type=int, default=None, help="default 900 (CUDA) / 300 (CPU)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--dim", type=int, default=32, help="head dim")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip-deterministic", action="store_true")
    p.add_argument("--cases", nargs="+", default=["encoder", "encoder_focus", "decoder"],
                   choices=["encoder", "encoder_focus", "decoder"])
    p.add_argument("--cpu-rss", action="store_true", help="CPU: also measure peak-RSS growth")
    p.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile-only", type=int, default=None, metavar="SM",
                   help="only compile the Triton kernels for CUDA sm_SM (e.g. 90) and report registers")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.rss_probe:
        return _rss_probe(args.rss_probe)
    if args.compile_only is not None:
        sys.exit(1 if compile_only(args.compile_only) else 0)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    img = args.img or ((800, 1333) if cuda else (320, 320))
    batch = args.batch or (2 if cuda else 1)
    dec_q = args.decoder_queries or (900 if cuda else 300)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (20 if cuda else 3)
    dtype = getattr(torch, args.dtype)
    shapes = level_shapes(*img)
    tokens = sum(h * w for h, w in shapes)
    cases = [
        ("encoder", tokens),                      # every token queries (Deformable-DETR / DINO)
        ("encoder_focus", int(tokens * 0.5) + 1),  # Focus-DETR layer 0 keeps the top half
        ("decoder", dec_q),
    ]
    if cuda:
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    print(f"device: {dev_name}; image {img[0]}x{img[1]} -> levels {shapes} = {tokens} tokens; "
          f"batch {batch}, {args.heads} heads, {args.points} points, d {args.dim}, {args.dtype}")
    results = [bench_case(name, shapes, batch, q, args, device, dtype) for name, q in cases
               if name in args.cases]
    report = dict(
        tool="tools/bench_msda.py",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dev_name, torch=torch.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", None),
        threads=None if cuda else torch.get_num_threads(),
        image=list(img), heads=args.heads, points=args.points, dim=args.dim, dtype=args.dtype,
        warmup=args.warmup, repeats=args.repeats, results=results,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
