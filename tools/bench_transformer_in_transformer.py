"""Benchmark the zoo's TNT against timm's (CPU inference throughput).

    python tools/bench_transformer_in_transformer.py [--model s] [--batch 16] [--img 224] [--rounds 7]
        [--threads 2] [--sizes 256 320] [--out result.json]

timm's ``tnt_{s,b}_patch16_224`` (random init, eval) and ``tnt_{s,b}_patch16_224_zoo`` loaded
with timm's weights through our ``checkpoint_filter_fn`` (outputs are checked equal first) run
alternately (A/B, then B/A, one forward each per round) and the per-model medians are reported, because
the machine may be shared. ``--sizes`` adds zoo-only timings at other input sizes (timm's TNT
only accepts its trained size). ``--profile`` prints the top operators of one zoo forward.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch


def _time(fn, cpu=None, faults=None):
    """Wall seconds of fn(); appends process CPU seconds and minor page faults to the given lists."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    fn()
    t = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if cpu is not None:
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    if faults is not None:
        faults.append(r1.ru_minflt - r0.ru_minflt)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("s", "b"), default="s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import timm
    import zoo  # noqa: F401  (registers the zoo models)
    from zoo.models.transformer_in_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    ref = timm.create_model(f"tnt_{args.model}_patch16_224").eval()
    ours = timm.create_model(f"tnt_{args.model}_patch16_224_zoo").eval()
    ours.load_state_dict(checkpoint_filter_fn(dict(ref.state_dict()), ours))
    x = torch.randn(args.batch, 3, args.img, args.img)

    with torch.inference_mode():
        diff = (ref(x) - ours(x)).abs().max().item()  # also the warm-up
        times = {"timm": [], "zoo": []}
        cpu = {"timm": [], "zoo": []}
        faults = {"timm": [], "zoo": []}
        models = {"timm": ref, "zoo": ours}
        for r in range(args.rounds):
            for k in (("timm", "zoo") if r % 2 == 0 else ("zoo", "timm")):  # no fixed position
                times[k].append(_time(lambda: models[k](x), cpu[k], faults[k]))
        extra = {}
        for s in args.sizes:
            xs = torch.randn(args.batch, 3, s, s)
            ours(xs)
            extra[s] = args.batch / statistics.median(_time(lambda: ours(xs)) for _ in range(max(3, args.rounds // 2)))
        if args.profile:
            with torch.profiler.profile(record_shapes=True) as prof:
                ours(x)
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=28, max_shapes_column_width=60))

    med = {k: statistics.median(v) for k, v in times.items()}
    res = dict(
        date=time.strftime("%Y-%m-%d %H:%M"), device=f"CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} threads, loadavg {os.getloadavg()[0]:.1f}", torch=torch.__version__,
        model=args.model, batch=args.batch, img=args.img, rounds=args.rounds, max_abs_logit_diff=diff,
        img_per_s_timm=args.batch / med["timm"], img_per_s_zoo=args.batch / med["zoo"],
        speedup=med["timm"] / med["zoo"],
        speedup_per_round_median=statistics.median(a / b for a, b in zip(times["timm"], times["zoo"])),
        # process CPU seconds (less sensitive to a shared machine than wall time) and minor page
        # faults (fresh memory from the OS) per forward, medians
        speedup_cpu_time=statistics.median(cpu["timm"]) / statistics.median(cpu["zoo"]),
        cpu_s={k: statistics.median(v) for k, v in cpu.items()},
        minor_faults={k: statistics.median(v) for k, v in faults.items()},
        zoo_img_per_s_at=extra,
        raw_s={k: [round(t, 4) for t in v] for k, v in times.items()},
    )
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
