"""Top-k classification accuracy over ``pred_score``/``gt_label`` data samples, and the dump of
every test sample's prediction that ``tools/test.py --out x.pkl`` writes."""
import pickle
from typing import Sequence, Union

import torch
from mmengine.evaluator import BaseMetric

from zoo.registry import METRICS

__all__ = ["Accuracy", "DumpPredictions", "topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int]) -> dict:
    """Percent of samples whose label is among the k best scores, for each k (capped at #classes)."""
    maxk = min(max(topk), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices
    hit = pred.eq(labels[:, None])
    return {f"top{k}": float(hit[:, :min(k, maxk)].any(dim=1).float().mean() * 100.0) for k in topk}


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Reports ``accuracy/top1`` (and ``accuracy/top5`` …) in percent."""

    default_prefix = "accuracy"

    def __init__(self, topk: Union[int, Sequence[int]] = (1, 5), collect_device: str = "cpu", prefix=None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        topk = (topk,) if isinstance(topk, int) else tuple(topk)
        if not topk or any(int(k) < 1 for k in topk):
            raise ValueError(f"topk must be positive integers, got {topk}")
        self.topk = tuple(int(k) for k in topk)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for ds in data_samples:
            if "pred_score" not in ds or "gt_label" not in ds:
                raise ValueError("Accuracy needs data samples with pred_score and gt_label "
                                 f"(got fields {sorted(ds)})")
            self.results.append((ds["pred_score"].detach().float().cpu(), int(ds["gt_label"])))

    def compute_metrics(self, results: list) -> dict:
        scores = torch.stack([r[0] for r in results])
        labels = torch.tensor([r[1] for r in results], dtype=torch.long)
        return topk_accuracy(scores, labels, self.topk)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


@METRICS.register_module()
class DumpPredictions(BaseMetric):
    """Writes every evaluated sample's prediction to a pickle: a list (in dataset order per rank,
    gathered on rank 0) of dicts with the data sample's fields, e.g. ``pred_score`` (tensor),
    ``pred_label``, ``gt_label`` and ``sample_idx`` for classification. Reports no metric."""

    default_prefix = "dump"

    def __init__(self, out_file: str, collect_device: str = "cpu"):
        super().__init__(collect_device=collect_device)
        if not str(out_file).endswith((".pkl", ".pickle")):
            raise ValueError(f"predictions are written as a pickle: the file name must end with .pkl, got "
                             f"{out_file!r} (for the metrics, use --out-item metrics)")
        self.out_file = str(out_file)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for ds in data_samples:
            self.results.append(_to_cpu(ds.to_dict() if hasattr(ds, "to_dict") else dict(ds)))

    def compute_metrics(self, results: list) -> dict:
        import os

        from .checkpoint import atomic_write_bytes

        os.makedirs(os.path.dirname(os.path.abspath(self.out_file)), exist_ok=True)
        atomic_write_bytes(self.out_file, pickle.dumps(results))
        return {}
