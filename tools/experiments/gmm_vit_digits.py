"""Digits comparison of Gaussian-mixture-masked attention against each host's baseline.

For every host (ViT, Swin, CaiT, PiT, T2T) the GMM model and its baseline are trained with the
same seed, data order and schedule on scikit-learn's digits (zoo.engine.DigitsDataset: 1,437
train / 360 val real 8x8 digits upsampled to 32 px, no download), then evaluated on val.

    python tools/experiments/gmm_vit_digits.py --threads 1 --hosts vit --seeds 0 1 2
    python tools/experiments/gmm_vit_digits.py --threads 1 --models gmm_vit_tiny_p4_32 --seeds 0 --out runs.jsonl
    python tools/experiments/gmm_vit_digits.py --aggregate runs.jsonl          # table from runs done in parallel
    python tools/experiments/gmm_vit_digits.py --threads 1 --models "vit_tiny_p4_32_gmmbase[avgpool]"   # ablation

Schedule (defaults, identical for every model): all 1,437 training digits, 6 epochs of batch 32
(270 steps), AdamW (lr 5e-4, wd 0.05), linear warm-up from 10 % of the peak lr over the first epoch,
then cosine to zero, label smoothing 0.1, random shifts of up to 4 px (the dataset's train
augmentation), no drop path; long enough for every baseline to leave chance level. A seed fixes the
initialisation, the data order and the shifts, so both models of a pair see the same batches.
Evaluation is on all 360 val digits after the last step (no early stopping, no best-epoch picking).
"cpu s" is the process CPU time of the training loop.
"""
import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.engine.datasets import DigitsDataset

HOSTS = {
    "vit": ("gmm_vit_tiny_p4_32", "vit_tiny_p4_32_gmmbase"),
    "swin": ("gmm_swin_tiny_p2_32", "swin_tiny_p2_32_gmmbase"),
    "cait": ("gmm_cait_tiny_p4_32", "cait_tiny_p4_32_gmmbase"),
    "pit": ("gmm_pit_tiny_p2_32", "pit_tiny_p2_32_gmmbase"),
    "t2t": ("gmm_t2t_vit_32", "t2t_vit_32_gmmbase"),
}
# Ablations (not part of the default run; pass them to --models): the GMM ViT also drops the cls
# token and mean-pools, so this baseline does the same and differs from it only by the mixture.
ABLATIONS = {
    "vit_tiny_p4_32_gmmbase[avgpool]": ("vit", "gmm_vit_tiny_p4_32", "vit_tiny_p4_32_gmmbase", dict(class_token=False)),
}
HOST_OF = {name: host for host, names in HOSTS.items() for name in names}
HOST_OF.update({name: host for name, (host, *_rest) in ABLATIONS.items()})
DEFAULTS = dict(epochs=6, batch=32, lr=5e-4, weight_decay=0.05, warmup_epochs=1.0, train_samples=None)
MEAN, STD = 0.5, 0.5


def _dataset(split, max_samples=None):
    return DigitsDataset(split=split, img_size=32, in_chans=3, augment=(split == "train"), max_samples=max_samples)


def _batch(ds, idx):
    items = [ds[int(i)] for i in idx]
    x = torch.stack([it["inputs"] for it in items]).float().div_(255).sub_(MEAN).div_(STD)
    y = torch.tensor([it["data_samples"].gt_label for it in items])
    return x, y


@torch.no_grad()
def evaluate(model, val):
    model.eval()
    correct = 0
    for s in range(0, len(val), 256):
        x, y = _batch(val, range(s, min(s + 256, len(val))))
        correct += int((model(x).argmax(-1) == y).sum())
    model.train()
    return 100.0 * correct / len(val)


def run(name: str, seed: int, epochs: int, batch: int, lr: float, weight_decay: float, warmup_epochs: float,
        train_samples=None, eval_every: int = 0) -> dict:
    """Train ``name`` from scratch on digits and return its val top-1 and training stats."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # the shift augmentation draws from numpy
    arch, kw = (ABLATIONS[name][2], ABLATIONS[name][3]) if name in ABLATIONS else (name, {})
    model = timm.create_model(arch, num_classes=10, **kw)
    train, val = _dataset("train", train_samples), _dataset("val")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch)
    total = epochs * steps_per_epoch
    warm = max(1, round(warmup_epochs * steps_per_epoch))

    def factor(s):
        if s < warm:
            return 0.1 + 0.9 * s / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)  # data order: same for every model of a seed
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for ep in range(epochs):
        order = torch.randperm(len(train), generator=g)
        losses = []
        for s in range(steps_per_epoch):
            x, y = _batch(train, order[s * batch:(s + 1) * batch])
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            losses.append(loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        msg = f"  {name} seed {seed} epoch {ep + 1}: train loss {statistics.fmean(losses):.3f}"
        if eval_every and ((ep + 1) % eval_every == 0) and ep + 1 < epochs:
            e0, ec0 = time.perf_counter(), time.process_time()
            msg += f", val {evaluate(model, val):.1f} %"
            t0, c0 = t0 + time.perf_counter() - e0, c0 + time.process_time() - ec0  # not training time
        print(msg, file=sys.stderr, flush=True)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return dict(model=name, host=HOST_OF.get(name, "?"), seed=seed, acc=evaluate(model, val),
                epoch_loss=statistics.fmean(losses), wall_s=train_s, cpu_s=cpu_s, steps=total,
                schedule=dict(epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay,
                              warmup_epochs=warmup_epochs, train_samples=len(train)))


def _mean_std(xs, fmt="{:.1f}"):
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.fmean(xs))} ± {fmt.replace('+', '').format(statistics.stdev(xs))}"


def table(records) -> str:
    """Markdown: one row per model (mean ± sample std over seeds), then GMM − baseline per host."""
    by_model = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    lines = ["| host | model | seeds | val top-1 (%) | last-epoch train loss | cpu s / run |",
             "|---|---|---|---|---|---|"]
    order = [n for names in HOSTS.values() for n in names] + list(ABLATIONS) + sorted(set(by_model) - set(HOST_OF))
    for name in order:
        rs = sorted(by_model.get(name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        lines.append(f"| {HOST_OF.get(name, '?')} | `{name}` | {' '.join(str(r['seed']) for r in rs)} | "
                     f"{_mean_std([r['acc'] for r in rs])} | {_mean_std([r['epoch_loss'] for r in rs], '{:.3f}')} | "
                     f"{statistics.fmean(r['cpu_s'] for r in rs):.0f} |")
    diff = ["", "| host | seeds paired | GMM − baseline, top-1 points (per seed) | mean ± std |", "|---|---|---|---|"]
    pairs = [(host, gmm, base) for host, (gmm, base) in HOSTS.items()]
    pairs += [(f"{host}, vs `{name}`", gmm, name) for name, (host, gmm, *_rest) in ABLATIONS.items()]
    for host, gmm, base in pairs:
        g = {r["seed"]: r["acc"] for r in by_model.get(gmm, [])}
        b = {r["seed"]: r["acc"] for r in by_model.get(base, [])}
        seeds = sorted(set(g) & set(b))
        if seeds:
            d = [g[s] - b[s] for s in seeds]
            diff.append(f"| {host} | {' '.join(map(str, seeds))} | {', '.join(f'{x:+.1f}' for x in d)} | "
                        f"{_mean_std(d, '{:+.1f}')} |")
    return "\n".join(lines + (diff if len(diff) > 3 else []))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    ap.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"])
    ap.add_argument("--train-samples", type=int, default=DEFAULTS["train_samples"],
                    help="use only the first N training digits (default: all 1,437)")
    ap.add_argument("--models", nargs="+", default=None, help="run only these models (names from HOSTS or ABLATIONS)")
    ap.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=list(HOSTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0, help="also print val top-1 every N epochs (stderr)")
    ap.add_argument("--out", default=None, help="append one JSON line per run to this file")
    ap.add_argument("--aggregate", nargs="+", default=None, metavar="JSONL",
                    help="print the table from earlier --out files instead of training")
    args = ap.parse_args()
    if args.aggregate:
        records = [json.loads(line) for path in args.aggregate for line in open(path) if line.strip()]
        print(table(records))
        return
    unknown = set(args.models or []) - set(HOST_OF)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(HOST_OF)}")
    torch.set_num_threads(args.threads)
    records = []
    names = [n for h in args.hosts for n in HOSTS[h]] + [n for n in ABLATIONS if args.models and n in args.models]
    for seed in args.seeds:
        for name in names:
            if args.models and name not in args.models:
                continue
            r = run(name, seed, args.epochs, args.batch, args.lr, args.weight_decay, args.warmup_epochs,
                    args.train_samples, args.eval_every)
            r["threads"] = args.threads
            records.append(r)
            print(f"{name} seed {seed}: val {r['acc']:.1f} %, last-epoch loss {r['epoch_loss']:.3f}, "
                  f"cpu {r['cpu_s']:.0f} s", file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
