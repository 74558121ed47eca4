"""Digits comparison of Gaussian-mixture-masked attention against each host's baseline.

For every host (ViT, Swin, CaiT, PiT, T2T) the GMM model and its baseline are trained with the
same seed, data order and schedule on scikit-learn's digits (zoo.engine.DigitsDataset: 1,437
train / 360 val real 8x8 digits upsampled to 32 px, no download), then evaluated on val.

    python tools/bench_gmm_vit.py [--epochs 2] [--batch 16] [--train-samples 720] [--hosts vit swin]
    python tools/bench_gmm_vit.py --models gmm_vit_tiny_p4_32      # one model (to run them in parallel)

Schedule (defaults): the first 720 training digits, 2 epochs of batch 16 (90 steps), AdamW (lr 2e-3,
wd 0.05), linear warm-up over the first 10 % of steps from 10 % then cosine to zero, label smoothing
0.1, random shifts of up to 4 px (the dataset's train augmentation), no drop path; evaluation on all
360 val digits. Sized so each run stays under 2 min of 2-core CPU time. The printed markdown rows
go into model_cards/gmm_vit.md; "cpu s" is the process CPU time of the training loop.
"""
import argparse
import math
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
MEAN, STD = 0.5, 0.5


def _tensors(split, max_samples=None):
    return DigitsDataset(split=split, img_size=32, in_chans=3, augment=(split == "train"), max_samples=max_samples)


def _batch(ds, idx):
    items = [ds[int(i)] for i in idx]
    x = torch.stack([it["inputs"] for it in items]).float().div_(255).sub_(MEAN).div_(STD)
    y = torch.tensor([it["data_samples"].gt_label for it in items])
    return x, y


def run(name: str, epochs: int, seed: int, batch: int = 16, lr: float = 2e-3, train_samples: int = 720):
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = timm.create_model(name, num_classes=10)
    train, val = _tensors("train", train_samples), _tensors("val")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train) / batch)
    total = epochs * steps_per_epoch
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for s in range(steps_per_epoch):
            x, y = _batch(train, order[s * batch:(s + 1) * batch])
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            last = loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(val), 256):
            x, y = _batch(val, range(s, min(s + 256, len(val))))
            correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / len(val), last, train_s, cpu_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-samples", type=int, default=720)
    ap.add_argument("--models", nargs="+", default=None, help="run only these models (names from HOSTS)")
    ap.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=list(HOSTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| host | model | val top-1 (%) | last train loss | wall s | cpu s |")
    print("|---|---|---|---|---|---|")
    for host in args.hosts:
        for name in HOSTS[host]:
            if args.models and name not in args.models:
                continue
            acc, loss, secs, cpu = run(name, args.epochs, args.seed, args.batch, args.lr, args.train_samples)
            print(f"| {host} | `{name}` | {acc:.1f} | {loss:.3f} | {secs:.0f} | {cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
