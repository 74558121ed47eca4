# SPDX-License-Identifier: Apache-2.0
# Derived from Seed3D/Puppeteer (Apache-2.0; Copyright (c) 2025 Bytedance Ltd. and/or its affiliates); see THIRD_PARTY_NOTICES.md
"""Rigging glue for the Runner (Puppeteer): an embedded set of procedural articulated shapes, the
skinning model wrapper, and the paper's skinning metrics plus a skeleton-token round trip.

Registered in the zoo's mmengine registries on import (``zoo.tasks`` imports this module).

* dataset item: ``dict(inputs=dict(points (Np, 6), joints (J, 6), parents (J,), valid (J,), shape (Ns, 6)),
  data_samples=BaseDataElement)``; J = ``max_joints`` (padded), the sample holds ``gt_skin`` (Np, J),
  ``joints_xyz`` (n, 3) and ``parents_list`` (n,).
* :class:`RiggingDataPreprocessor` stacks a batch; :class:`SkinningModel` wraps a zoo skinning network
  (``timm.create_model`` name, e.g. ``puppeteer_skin_small``). Upstream's training code is not public;
  the loss here is the cross entropy between the ground-truth weights and the predicted softmax over
  the valid joints.
* :class:`SkinningMetric`: upstream's evaluation (zero weights below 1e-3, zero weights below
  ``filter_thre`` x the row maximum, renormalise, keep rows whose ground truth sums to 1), then
  precision, recall and average L1 per shape, averaged over shapes. Here the ground truth is given on
  the sampled points themselves (no mesh, so no nearest-vertex lookup as upstream does).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.structures import BaseDataElement
from torch.utils.data import Dataset

from zoo.engine import build_data_preprocessor, check_model_name
from zoo.registry import DATASETS, METRICS, MODELS

__all__ = ["make_articulated_shape", "make_articulated_set", "ArticulatedShapesDataset", "RiggingDataPreprocessor",
           "SkinningModel", "SkinningMetric", "skinning_scores"]

_EMBEDDED_VERSION = 1
_INPUT_KEYS = ("points", "joints", "parents", "valid", "shape")


# ------------------------------------------------------------------------------------------------
# procedural articulated shapes
# ------------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)


def _bend(rng: np.random.RandomState, d: np.ndarray, max_angle: float) -> np.ndarray:
    """Rotate direction d by a random angle up to max_angle about a random perpendicular axis."""
    axis = _unit(np.cross(d, rng.randn(3)))
    a = rng.uniform(-max_angle, max_angle)
    return _unit(d * np.cos(a) + np.cross(axis, d) * np.sin(a) + axis * np.dot(axis, d) * (1 - np.cos(a)))


def _skeleton(rng: np.random.RandomState, max_joints: int) -> Tuple[np.ndarray, np.ndarray]:
    """Joints (n, 3) and parents (n,) (-1 root, parents before children): a bent chain or a tree."""
    joints, parents = [np.zeros(3)], [-1]
    if rng.rand() < 0.4:  # chain
        n = rng.randint(3, min(7, max_joints) + 1)
        d = _unit(rng.randn(3))
        for i in range(1, n):
            d = _bend(rng, d, 0.9)
            joints.append(joints[-1] + d * rng.uniform(0.15, 0.28))
            parents.append(i - 1)
    else:  # tree: a spine of 1-2 bones, 2-4 limbs of 1-3 bones from spine joints
        d = _unit(rng.randn(3))
        for _ in range(rng.randint(1, 3)):
            joints.append(joints[-1] + d * rng.uniform(0.15, 0.25))
            parents.append(len(joints) - 2)
        spine = list(range(len(joints)))
        for _ in range(rng.randint(2, 5)):
            if len(joints) >= max_joints:
                break
            at = int(spine[rng.randint(len(spine))])
            ld = _unit(rng.randn(3))
            prev = at
            for _ in range(rng.randint(1, 4)):
                if len(joints) >= max_joints:
                    break
                ld = _bend(rng, ld, 0.6)
                joints.append(joints[prev] + ld * rng.uniform(0.12, 0.22))
                parents.append(prev)
                prev = len(joints) - 1
    return np.asarray(joints, dtype=np.float64), np.asarray(parents, dtype=np.int64)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (P, S) from points (P, 3) to segments a-b (S, 3), and the closest axis points (P, S, 3)."""
    ab = b - a
    t = np.clip(((p[:, None] - a[None]) * ab[None]).sum(-1) / ((ab * ab).sum(-1)[None] + 1e-12), 0, 1)
    c = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None] - c, axis=-1), c


def _sample_surface(rng, a, b, r, n) -> np.ndarray:
    """n points (xyz + normal) on the surface of the union of capsules (a_i, b_i, r_i)."""
    length = np.linalg.norm(b - a, axis=1)
    area = 2 * np.pi * r * length + 4 * np.pi * r ** 2
    out = np.zeros((0, 6))
    while out.shape[0] < n:
        m = 4 * n
        bone = rng.choice(len(a), size=m, p=area / area.sum())
        t = rng.rand(m)
        axis_pt = a[bone] + t[:, None] * (b[bone] - a[bone])
        on_cap = rng.rand(m) < (4 * np.pi * r[bone] ** 2) / area[bone]
        normal = _unit(rng.randn(m, 3))
        axis_dir = _unit(b[bone] - a[bone])
        side = normal - (normal * axis_dir).sum(-1, keepdims=True) * axis_dir  # perpendicular to the axis
        cap_end = np.where((normal * axis_dir).sum(-1, keepdims=True) > 0, b[bone], a[bone])
        normal = np.where(on_cap[:, None], normal, _unit(side))
        centre = np.where(on_cap[:, None], cap_end, axis_pt)
        pts = centre + normal * r[bone][:, None]
        d, _ = _segment_distance(pts, a, b)
        inside_other = (d < r[None] - 1e-6)
        inside_other[np.arange(m), bone] = False
        keep = ~inside_other.any(1)
        out = np.concatenate([out, np.concatenate([pts, normal], 1)[keep]])
    return out[rng.choice(out.shape[0], n, replace=False)]


def make_articulated_shape(rng: np.random.RandomState, num_points: int = 256, num_shape_points: int = 64,
                           max_joints: int = 12, tau: float = 0.02, cut: float = 0.05) -> dict:
    """One shape: capsules along the bones of a random chain or tree skeleton, scaled into
    [-0.45, 0.45]^3. Ground-truth skinning: each point's weight on bone b is
    ``exp(-(s_b - min_b s_b) / tau)`` (s_b: distance to b's capsule surface), cut below ``cut``,
    normalised, and given to the bone's parent joint (which drives it); leaf joints get none. Joint
    weights below 0.15 x the row maximum are then dropped and the rest renormalised."""
    joints, parents = _skeleton(rng, max_joints)
    child = np.nonzero(parents >= 0)[0]
    a, b = joints[parents[child]], joints[child]
    r = rng.uniform(0.03, 0.06, size=len(child))
    lo = np.minimum(a, b).min(0) - r.max()
    hi = np.maximum(a, b).max(0) + r.max()
    centre, scale = (lo + hi) / 2, 0.9 / (hi - lo).max()
    joints, a, b, r = (joints - centre) * scale, (a - centre) * scale, (b - centre) * scale, r * scale
    points = _sample_surface(rng, a, b, r, num_points)
    shape = _sample_surface(rng, a, b, r, num_shape_points)
    d, _ = _segment_distance(points[:, :3], a, b)
    s = d - r[None]
    w_bone = np.exp(-(s - s.min(1, keepdims=True)) / tau)
    w_bone[w_bone < cut] = 0.0
    w_bone /= w_bone.sum(1, keepdims=True)
    skin = np.zeros((num_points, len(joints)))
    np.add.at(skin.T, parents[child], w_bone.T)
    # weights under upstream's evaluation threshold (0.15 x the row maximum) are dropped, so the
    # evaluation's post-processing leaves the ground truth unchanged
    skin[skin < 0.15 * skin.max(1, keepdims=True)] = 0.0
    skin /= skin.sum(1, keepdims=True)
    return dict(points=points.astype(np.float32), shape=shape.astype(np.float32), joints=joints.astype(np.float32),
                parents=parents, skin=skin.astype(np.float32))


def make_articulated_set(num: int, seed: int = 0, **kwargs) -> List[dict]:
    """``num`` deterministic shapes (see :func:`make_articulated_shape`)."""
    rng = np.random.RandomState(seed)
    return [make_articulated_shape(rng, **kwargs) for _ in range(num)]


@DATASETS.register_module()
class ArticulatedShapesDataset(Dataset):
    """The embedded rigging set, generated in memory on first use; train and val use different seeds."""

    def __init__(self, split: str = "train", num_samples: Optional[int] = None, num_points: int = 256,
                 num_shape_points: int = 64, max_joints: int = 12, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if max_joints < 3:
            raise ValueError(f"max_joints must be >= 3, got {max_joints}")
        num = int(num_samples) if num_samples is not None else (256 if split == "train" else 64)
        self.split, self.max_joints = split, int(max_joints)
        self.samples = make_articulated_set(num, seed=seed * 2 + (0 if split == "train" else 1) + 7000,
                                            num_points=num_points, num_shape_points=num_shape_points,
                                            max_joints=max_joints)

    @property
    def metainfo(self) -> dict:
        return dict(task="skinning", version=_EMBEDDED_VERSION)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        from zoo.models.puppeteer import skeleton_input

        s = self.samples[idx]
        n, J = len(s["parents"]), self.max_joints
        joints = torch.zeros(J, 3)
        joints[:n] = torch.from_numpy(s["joints"])
        parents = torch.full((J,), -1, dtype=torch.long)
        parents[:n] = torch.from_numpy(s["parents"])
        valid = torch.zeros(J, dtype=torch.bool)
        valid[:n] = True
        skin = torch.zeros(s["skin"].shape[0], J)
        skin[:, :n] = torch.from_numpy(s["skin"])
        ds = BaseDataElement(metainfo=dict(name=f"{self.split}_{idx:04d}", num_joints=n))
        ds.gt_skin = skin
        ds.joints_xyz = torch.from_numpy(s["joints"])
        ds.parents_list = torch.from_numpy(s["parents"])
        inputs = dict(points=torch.from_numpy(s["points"]), joints=skeleton_input(joints, parents),
                      parents=parents, valid=valid, shape=torch.from_numpy(s["shape"]))
        return dict(inputs=inputs, data_samples=ds)


# ------------------------------------------------------------------------------------------------
# preprocessor and model
# ------------------------------------------------------------------------------------------------
@MODELS.register_module()
class RiggingDataPreprocessor(BaseDataPreprocessor):
    """Stacks the per-sample input tensors (a dict of lists after pseudo_collate) and moves them."""

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        if isinstance(inputs, (list, tuple)):  # list of dicts
            inputs = {k: [x[k] for x in inputs] for k in inputs[0]}
        missing = [k for k in _INPUT_KEYS if k not in inputs]
        if missing:
            raise ValueError(f"rigging inputs need keys {_INPUT_KEYS}; missing {missing}")
        out = {k: torch.stack(list(v)) if isinstance(v, (list, tuple)) else v for k, v in inputs.items()}
        for k in ("points", "joints", "shape"):
            out[k] = out[k].float()
        return dict(inputs=out, data_samples=data.get("data_samples"))


@MODELS.register_module()
class SkinningModel(BaseModel):
    """A zoo skinning network (``timm.create_model`` name) as an mmengine model.

    Loss: cross entropy ``-sum_j w_gt log w_pred`` per point (softmax over the valid joints), averaged
    over points with ground truth. Prediction: the network's skinning weights (``pred_skin``).
    """

    def __init__(self, model_name: str = "puppeteer_skin_small", pretrained: bool = False,
                 model_kwargs: Optional[dict] = None, data_preprocessor: Optional[Union[dict, nn.Module]] = None,
                 init_cfg: Optional[dict] = None):
        import timm

        import zoo  # noqa: F401

        check_model_name(model_name)
        super().__init__(data_preprocessor=build_data_preprocessor(data_preprocessor, "RiggingDataPreprocessor"), init_cfg=init_cfg)
        self.model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
        if not hasattr(self.model, "forward_head") or not hasattr(self.model, "skeleton_condition"):
            raise TypeError(f"{model_name!r} is not a zoo skinning network")
        self.model.is_init = True  # mmengine's init_weights would re-initialise it

    def _features(self, inputs: dict):
        return self.model.forward_features(inputs["points"], inputs["joints"], inputs["shape"], inputs["valid"],
                                           parents=inputs["parents"], point_feats=inputs.get("point_feats"))

    def loss(self, inputs: dict, data_samples) -> Dict[str, torch.Tensor]:
        if data_samples is None or any("gt_skin" not in ds for ds in data_samples):
            raise ValueError("mode='loss' needs data_samples with a gt_skin field")
        gt = torch.stack([ds.gt_skin for ds in data_samples]).to(inputs["points"].device)
        p, j = self._features(inputs)
        logp = self.model.forward_head(p, j, inputs["valid"], log=True, mask_padded=True)
        ce = -torch.where(gt > 0, gt * logp, torch.zeros_like(logp)).sum(-1)
        rows = gt.sum(-1) > 0.5
        return dict(loss_skin=ce[rows].mean())

    @torch.no_grad()
    def predict(self, inputs: dict, data_samples=None) -> List[BaseDataElement]:
        p, j = self._features(inputs)
        w = self.model.forward_head(p, j, inputs["valid"])
        if data_samples is None:
            data_samples = [BaseDataElement() for _ in range(w.shape[0])]
        for ds, wi, vi in zip(data_samples, w, inputs["valid"]):
            ds.pred_skin = wi.cpu()
            ds.joint_valid = vi.cpu()
        return data_samples

    def forward(self, inputs: dict, data_samples=None, mode: str = "tensor"):
        if mode == "tensor":
            p, j = self._features(inputs)
            return self.model.forward_head(p, j, inputs["valid"])
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def skinning_scores(pred: np.ndarray, gt: np.ndarray, filter_thre: float = 0.15,
                    zero_below: float = 1e-3) -> Optional[Tuple[float, float, float]]:
    """Upstream's per-shape evaluation on the valid joint columns: (precision, recall, mean L1), or
    None when no row has a ground truth summing to 1."""
    pred = np.array(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    pred[pred < zero_below] = 0.0
    pred[pred < pred.max(1, keepdims=True) * filter_thre] = 0.0
    pred = pred / (pred.sum(1, keepdims=True) + 1e-10)
    rows = np.abs(gt.sum(1) - 1) < 1e-2
    pred, gt = pred[rows], gt[rows]
    if not len(gt):
        return None
    both = np.logical_and(pred > 0, gt > 0).sum()
    precision = both / (np.sum(pred > 0) + 1e-10)
    recall = both / (np.sum(gt > 0) + 1e-10)
    l1 = np.abs(pred - gt).sum() / len(pred)
    return float(precision), float(recall), float(l1)


@METRICS.register_module()
class SkinningMetric(BaseMetric):
    """Skinning precision / recall / average L1 as upstream's ``evaluate`` (prefix ``skin``), plus
    ``token_err`` (largest coordinate error) and ``token_parents_ok`` (fraction of skeletons whose
    parents survive) of the ground-truth skeletons through the joint tokenizer."""

    default_prefix = "skin"

    def __init__(self, filter_thre: float = 0.15, zero_below: float = 1e-3, n_bins: int = 128,
                 collect_device: str = "cpu", prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not 0.0 <= filter_thre < 1.0:
            raise ValueError(f"filter_thre must be in [0, 1), got {filter_thre}")
        self.filter_thre, self.zero_below, self.n_bins = float(filter_thre), float(zero_below), int(n_bins)

    def process(self, data_batch, data_samples: Sequence) -> None:
        from zoo.models.puppeteer import detokenize_skeleton, tokenize_skeleton

        def get(x, name):
            return x[name] if isinstance(x, dict) else getattr(x, name)

        for ds in data_samples:
            pred = torch.as_tensor(get(ds, "pred_skin")).float()
            gt = torch.as_tensor(get(ds, "gt_skin")).float()
            valid = torch.as_tensor(get(ds, "joint_valid")).bool()
            scores = skinning_scores(pred[:, valid].numpy(), gt[:, valid].numpy(), self.filter_thre, self.zero_below)
            joints, parents = torch.as_tensor(get(ds, "joints_xyz")), torch.as_tensor(get(ds, "parents_list"))
            back = detokenize_skeleton(tokenize_skeleton(joints, parents, self.n_bins), self.n_bins)
            err = float((back[0] - joints.float()).abs().max()) if back is not None else float("inf")
            ok = back is not None and torch.equal(back[1], parents.long())
            self.results.append((scores, err, ok))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        scored = [r[0] for r in results if r[0] is not None]
        arr = np.asarray(scored) if scored else np.full((1, 3), np.nan)
        return dict(precision=float(arr[:, 0].mean()), recall=float(arr[:, 1].mean()), avg_l1=float(arr[:, 2].mean()),
                    token_err=float(max(r[1] for r in results)) if results else float("nan"),
                    token_parents_ok=float(np.mean([r[2] for r in results])) if results else float("nan"))
