"""CPU inference throughput of a zoo HaloNet against timm's original, interleaved in one process.

    python tools/bench_halonet.py --pairs halonet26t_zoo:halonet26t --size 256 --batch 16 --threads 2

Runs A/B/A/B... for ``--rounds`` rounds (after warm-up) and prints JSON with the median img/s of
each model and the ratio zoo / timm. Interleaving keeps both models under the same machine load.
Also reports parameters and GMACs (fvcore-free: torch.utils.flop_counter, MACs = FLOPs / 2).
"""
import argparse
import json
import statistics
import time

import torch
import timm

import zoo  # noqa: F401  (registers the zoo models)


def _gmacs(model, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops() / 2 / 1e9 / x.shape[0]


def _time(model, x):
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        return x.shape[0] / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--pairs', nargs='+', default=['halonet26t_zoo:halonet26t'])
    p.add_argument('--size', type=int, default=256)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for pair in args.pairs:
        ours_name, ref_name = pair.split(':')
        ours = timm.create_model(ours_name).eval()
        ref = timm.create_model(ref_name).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        for _ in range(args.warmup):
            _time(ours, x)
            _time(ref, x)
        a, b = [], []
        for _ in range(args.rounds):
            a.append(_time(ours, x))
            b.append(_time(ref, x))
        xs = x[:1]
        res = dict(
            zoo=ours_name, timm=ref_name, size=args.size, batch=args.batch, threads=args.threads,
            zoo_img_s=round(statistics.median(a), 2), timm_img_s=round(statistics.median(b), 2),
            ratio=round(statistics.median(a) / statistics.median(b), 3),
            zoo_rounds=[round(v, 2) for v in a], timm_rounds=[round(v, 2) for v in b],
            params_m=round(sum(t.numel() for t in ours.parameters()) / 1e6, 3),
            gmacs=round(_gmacs(ours, xs), 3), timm_gmacs=round(_gmacs(ref, xs), 3),
            device=f'CPU, {args.threads} threads', torch_version=torch.__version__, timm_version=timm.__version__,
            date=time.strftime('%Y-%m-%d'),
        )
        print(json.dumps(res))
        results.append(res)
    return results


if __name__ == '__main__':
    main()
