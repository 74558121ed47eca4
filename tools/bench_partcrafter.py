"""PartCrafter numbers for the model card.

    OMP_NUM_THREADS=1 python tools/bench_partcrafter.py baselines   # reference points for the Chamfer metric
    python tools/bench_partcrafter.py speed                         # packed varlen call vs per-object loop

``baselines``: on the embedded val set (the config's), the matched per-part Chamfer of (a) every
generated part = T random points of the whole-object condition (knows the object, not the parts),
(b) the untrained tiny DiT sampled as in validation, (c) the ground truth of another object.
``speed``: one global self-attention over a batch of objects with different part counts, one
``zoo.kernels.attention`` call on the packed varlen layout vs a Python loop over objects (upstream's
training path), forward+backward, CPU, interleaved A/B, medians.
"""
import argparse
import os.path as osp
import statistics
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, "configs", "partcrafter", "partcrafter_dit_tiny_parts.py")


def baselines():
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATASETS, MODELS

    import zoo.engine  # noqa: F401
    from zoo.engine.partcrafter_task import PartChamferMetric

    cfg = Config.fromfile(CONFIG)
    ds = DATASETS.build(cfg.val_dataloader.dataset)
    items = [ds[i] for i in range(len(ds))]
    g = torch.Generator().manual_seed(0)
    whole, other = PartChamferMetric(), PartChamferMetric()
    for i, it in enumerate(items):
        gt = it["data_samples"].gt_parts
        cond = ds.items[i]["cond"]
        n, T = gt.shape[:2]
        idx = torch.stack([torch.randperm(cond.shape[0], generator=g)[:T] for _ in range(n)])
        whole.process(None, [dict(pred_parts=torch.from_numpy(cond)[idx], gt_parts=gt)])
        j = next(k for k in range(i + 1, i + len(items)) if items[k % len(items)]["inputs"]["parts"].shape[0] == n)
        other.process(None, [dict(pred_parts=items[j % len(items)]["inputs"]["parts"], gt_parts=gt)])
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    untrained = PartChamferMetric()
    for s in range(0, len(items), 32):
        data = model.data_preprocessor(pseudo_collate(items[s:s + 32]))
        untrained.process(None, model(**data, mode="predict"))
    for name, m in (("whole-object points as every part", whole), ("another object's parts", other),
                    ("untrained tiny DiT", untrained)):
        print(f"{name:36s} {m.compute_metrics(m.results)}")


def speed(reps: int = 7):
    import zoo.kernels as K

    torch.set_num_threads(2)
    counts = [2, 3, 1, 4, 2, 3, 1, 4]
    S, H, hd = 129, 4, 32
    c = torch.tensor(counts)
    L = int(c.sum()) * S
    lay = K.varlen(torch.cat([c.new_zeros(1), c.cumsum(0)]) * S)
    q, k, v = (torch.randn(1, H, L, hd, requires_grad=True) for _ in range(3))

    def packed():
        K.attention(q, k, v, lay).sum().backward()

    def loop():
        outs, s = [], 0
        for n in counts:
            sl = slice(s * S, (s + n) * S)
            outs.append(K.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl]))
            s += n
        torch.cat(outs, 2).sum().backward()

    ta, tb = [], []
    packed(), loop()
    for _ in range(reps):
        for f, acc in ((packed, ta), (loop, tb)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    a, b = statistics.median(ta), statistics.median(tb)
    print(f"parts {counts}, {S} tokens/part, {H} heads x {hd}: packed varlen {a * 1e3:.1f} ms, "
          f"per-object loop {b * 1e3:.1f} ms (fwd+bwd, median of {reps}, ratio loop/packed {b / a:.2f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["baselines", "speed"])
    a = p.parse_args()
    sys.exit(baselines() if a.what == "baselines" else speed())
