"""Reference points for PartCrafter's matched per-part Chamfer metric (the model card's table).

    OMP_NUM_THREADS=1 python tools/experiments/partcrafter_baselines.py

On the embedded val set of the tiny config, the metric for (a) every generated part = T random points
of the whole-object condition (knows the object, not its parts), (b) the untrained tiny DiT sampled as
in validation, (c) the ground-truth parts of another object with the same part count. The packed
varlen attention against a per-object loop is timed by ``tools/bench_ops.py`` (varlen workload).
"""
import sys
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "partcrafter" / "partcrafter_dit_tiny_parts.py"


def baselines() -> dict:
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATASETS, MODELS

    import zoo.engine  # noqa: F401  (registers the engine components)
    from zoo.tasks.part_generation import PartChamferMetric

    cfg = Config.fromfile(str(CONFIG))
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
    out = {}
    for name, m in (("whole-object points as every part", whole), ("another object's parts", other),
                    ("untrained tiny DiT", untrained)):
        out[name] = m.compute_metrics(m.results)
        print(f"{name:36s} {out[name]}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(f"usage: {sys.argv[0]} (no arguments)")
    baselines()
