# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from wgsxm/PartCrafter (MIT; Copyright (c) 2025 Yuchen Lin); see THIRD_PARTY_NOTICES.md
"""PartCrafter glue for the Runner: an embedded procedural multi-part object set, the rectified-flow
training wrapper, and a per-part Chamfer metric.

Registered in the zoo's mmengine registries on import (``zoo.tasks`` imports this module).

* :class:`PartObjectsDataset`: each object is 1..``max_parts`` primitives (sphere, box, cylinder,
  cone, torus) with random size, aspect, orientation and position. A part is ``T`` points sampled on
  its surface (the part's "latent": ``(T, 3)``, one token per point). The condition is ``M`` points
  sampled on the whole object (no part labels) encoded with fixed Fourier features, so the model
  has to split the object into parts. Parts come in random order (upstream shuffles parts too).
  Built deterministically from the split's seed; nothing is downloaded.
* :class:`RectifiedFlowPartModel`: upstream's objective. Per object t = sigmoid(N(mean, std))
  (logit-normal), repeated over its parts; ``x_t = (1 - t) x0 + t noise``; the network sees
  ``1000 t`` and is regressed on ``x0 - noise``; the condition of an object is zeroed with
  probability ``cfg_dropout``. Sampling: Euler from t = 1 to 0 with optional classifier-free guidance
  (unconditional and conditional objects in one packed call).
* :class:`PartChamferMetric`: per object, the Chamfer distance (mean nearest-neighbour distance both
  ways, not squared) between every generated and every ground-truth part; parts are matched by the
  best permutation (ids carry no meaning), ``part_cd`` is the mean matched distance per part.
  ``object_cd`` compares the unions of the parts.
"""
import itertools
import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.structures import BaseDataElement
from torch.utils.data import Dataset

from zoo.engine import build_data_preprocessor, check_model_name
from zoo.registry import DATASETS, METRICS, MODELS

__all__ = ["make_part", "make_object", "fourier_encode", "PartObjectsDataset", "PartDataPreprocessor",
           "RectifiedFlowPartModel", "PartChamferMetric", "chamfer", "matched_part_chamfer"]

PRIMITIVES = ("sphere", "box", "cylinder", "cone", "torus")


# ------------------------------------------------------------------------------------------------
# procedural objects
# ------------------------------------------------------------------------------------------------
def _rotation(rng: np.random.RandomState) -> np.ndarray:
    q, r = np.linalg.qr(rng.randn(3, 3))
    return q * np.sign(np.diag(r))[None]


def _unit_surface(rng: np.random.RandomState, kind: str, n: int) -> np.ndarray:
    """n points on the surface of a unit-sized primitive centred at the origin."""
    if kind == "sphere":
        p = rng.randn(n, 3)
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if kind == "box":
        face = rng.randint(6, size=n)
        p = rng.uniform(-1, 1, size=(n, 3))
        p[np.arange(n), face // 2] = np.where(face % 2, 1.0, -1.0)
        return p
    if kind in ("cylinder", "cone"):
        # side vs caps by area (radius 1, height 2)
        side_area = 2 * np.pi * 2 if kind == "cylinder" else np.pi * np.sqrt(5)
        cap_area = 2 * np.pi if kind == "cylinder" else np.pi
        on_side = rng.rand(n) < side_area / (side_area + cap_area)
        a = rng.uniform(0, 2 * np.pi, n)
        z = rng.uniform(-1, 1, n)
        if kind == "cylinder":
            r = np.where(on_side, 1.0, np.sqrt(rng.rand(n)))
            z = np.where(on_side, z, np.where(rng.rand(n) < 0.5, -1.0, 1.0))
        else:  # apex at z = 1; side area density ~ radius
            s = np.sqrt(rng.rand(n))
            r = np.where(on_side, s, np.sqrt(rng.rand(n)))
            z = np.where(on_side, 1 - 2 * s, -1.0)
        return np.stack([r * np.cos(a), r * np.sin(a), z], 1)
    if kind == "torus":
        R, r = 1.0, 0.35
        out = np.zeros((0, 3))
        while out.shape[0] < n:  # rejection sampling for uniform area density
            u, v = rng.uniform(0, 2 * np.pi, (2, 2 * n))
            keep = rng.rand(2 * n) < (R + r * np.cos(v)) / (R + r)
            u, v = u[keep], v[keep]
            out = np.concatenate([out, np.stack([(R + r * np.cos(v)) * np.cos(u), (R + r * np.cos(v)) * np.sin(u),
                                                 r * np.sin(v)], 1)])
        return out[:n]
    raise ValueError(f"unknown primitive {kind!r}; choose from {PRIMITIVES}")


def make_part(rng: np.random.RandomState, kind: str, n: int, centre: np.ndarray, size: float) -> np.ndarray:
    """n surface points of a primitive with random aspect and orientation, scaled and placed."""
    aspect = rng.uniform(0.5, 1.0, 3)
    return (_unit_surface(rng, kind, n) * aspect * size) @ _rotation(rng).T + centre


def make_object(rng: np.random.RandomState, num_parts: int, points_per_part: int, num_cond: int) -> dict:
    """A composed object: parts (n, T, 3) in [-1, 1], the whole-object condition points (M, 3)."""
    centres = [np.zeros(3)]
    while len(centres) < num_parts:  # parts spread around the first one, not too close to each other
        c = rng.uniform(-0.8, 0.8, 3)
        if min(np.linalg.norm(c - o) for o in centres) > 0.5:
            centres.append(c)
    kinds = rng.choice(PRIMITIVES, size=num_parts)
    sizes = rng.uniform(0.2, 0.4, num_parts)
    dense = [make_part(rng, k, 4 * points_per_part, c, s) for k, c, s in zip(kinds, centres, sizes)]
    allp = np.concatenate(dense)
    mid = (allp.max(0) + allp.min(0)) / 2
    scale = np.abs(allp - mid).max()
    dense = [(d - mid) / scale for d in dense]
    parts = np.stack([d[rng.choice(len(d), points_per_part, replace=False)] for d in dense])
    # condition: surface points of the whole object, area-weighted by part (no part labels)
    union = np.concatenate(dense)
    cond = union[rng.choice(len(union), num_cond, replace=False)]
    order = rng.permutation(num_parts)
    return dict(parts=parts[order].astype(np.float32), cond=cond.astype(np.float32), kinds=list(kinds[order]))


def fourier_encode(points: torch.Tensor, num_freqs: int = 4) -> torch.Tensor:
    """xyz and sin/cos(2^k pi xyz), k < num_freqs: ``(..., 3 + 6 num_freqs)``."""
    freqs = (2.0 ** torch.arange(num_freqs, dtype=points.dtype)) * math.pi
    ang = points[..., None] * freqs  # (..., 3, F)
    return torch.cat([points, torch.sin(ang).flatten(-2), torch.cos(ang).flatten(-2)], dim=-1)


@DATASETS.register_module()
class PartObjectsDataset(Dataset):
    """Deterministic procedural multi-part objects (see the module docstring)."""

    SEEDS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, split: str = "train", num_samples: Optional[int] = None, points_per_part: int = 32,
                 num_cond: int = 64, min_parts: int = 1, max_parts: int = 4, num_freqs: int = 4,
                 seed: Optional[int] = None):
        if split not in self.SEEDS:
            raise ValueError(f"split must be one of {sorted(self.SEEDS)}, got {split!r}")
        if not 1 <= min_parts <= max_parts:
            raise ValueError(f"need 1 <= min_parts <= max_parts, got {min_parts}, {max_parts}")
        self.split = split
        n = num_samples if num_samples is not None else (512 if split == "train" else 64)
        rng = np.random.RandomState(self.SEEDS[split] * 7919 + 17 if seed is None else seed)
        self.items = [make_object(rng, int(rng.randint(min_parts, max_parts + 1)), points_per_part, num_cond)
                      for _ in range(n)]
        self.num_freqs = num_freqs
        self.context_dim = 3 + 6 * num_freqs

    @property
    def metainfo(self) -> dict:
        return dict(name="procedural_part_objects", context_dim=self.context_dim)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        it = self.items[idx]
        parts = torch.from_numpy(it["parts"])
        ctx = fourier_encode(torch.from_numpy(it["cond"]), self.num_freqs)
        ds = BaseDataElement(metainfo=dict(index=idx, num_parts=parts.shape[0]))
        ds.gt_parts = parts
        return dict(inputs=dict(parts=parts, context=ctx), data_samples=ds)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
@MODELS.register_module()
class PartDataPreprocessor(BaseDataPreprocessor):
    """Packs a batch: parts of all objects stacked object by object, counts, stacked conditions."""

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        if isinstance(inputs, (list, tuple)):
            inputs = {k: [x[k] for x in inputs] for k in inputs[0]}
        if "parts" not in inputs or "context" not in inputs:
            raise ValueError(f"part inputs need keys 'parts' and 'context', got {sorted(inputs)}")
        parts = list(inputs["parts"])
        out = dict(latents=torch.cat(parts).float(),
                   num_parts=torch.tensor([p.shape[0] for p in parts], dtype=torch.long, device=parts[0].device),
                   context=torch.stack(list(inputs["context"])).float())
        return dict(inputs=out, data_samples=data.get("data_samples"))


@MODELS.register_module()
class RectifiedFlowPartModel(BaseModel):
    """A zoo PartCrafter DiT (``timm.create_model`` name) trained with upstream's rectified flow."""

    def __init__(self, model_name: str = "partcrafter_dit_tiny", pretrained: bool = False,
                 model_kwargs: Optional[dict] = None, cfg_dropout: float = 0.1, logit_mean: float = 0.0,
                 logit_std: float = 1.0, num_train_timesteps: int = 1000, sample_steps: int = 20,
                 guidance_scale: float = 1.0, sample_seed: int = 0,
                 data_preprocessor: Optional[Union[dict, nn.Module]] = None, init_cfg: Optional[dict] = None):
        import timm

        import zoo  # noqa: F401

        check_model_name(model_name)
        super().__init__(data_preprocessor=build_data_preprocessor(data_preprocessor, "PartDataPreprocessor"), init_cfg=init_cfg)
        self.model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
        if not hasattr(self.model, "global_block_ids"):
            raise TypeError(f"{model_name!r} is not a zoo PartCrafter DiT")
        self.model.is_init = True  # mmengine's init_weights would re-initialise it
        self.cfg_dropout, self.logit_mean, self.logit_std = cfg_dropout, logit_mean, logit_std
        self.T = num_train_timesteps
        self.sample_steps, self.guidance_scale, self.sample_seed = sample_steps, guidance_scale, sample_seed

    def loss(self, inputs: dict) -> Dict[str, torch.Tensor]:
        x0, counts, ctx = inputs["latents"], inputs["num_parts"], inputs["context"]
        B = counts.numel()
        t = torch.sigmoid(torch.randn(B, device=x0.device) * self.logit_std + self.logit_mean)
        drop = torch.rand(B, device=x0.device) < self.cfg_dropout
        ctx = torch.where(drop[:, None, None], torch.zeros_like(ctx), ctx)
        tp = t.repeat_interleave(counts)[:, None, None]
        noise = torch.randn_like(x0)
        xt = (1 - tp) * x0 + tp * noise
        pred = self.model(xt, t * self.T, ctx, counts)
        return dict(loss=F.mse_loss(pred.float(), (x0 - noise).float()))

    @torch.no_grad()
    def sample(self, counts: torch.Tensor, context: torch.Tensor, tokens: int, steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Euler integration of the learned flow from noise (t = 1) to data (t = 0)."""
        steps = steps or self.sample_steps
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        N = int(counts.sum())
        x = torch.randn(N, tokens, self.model.in_chans, generator=generator).to(context.device)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=context.device)
        for i in range(steps):
            t = ts[i].expand(counts.numel())
            if w != 1.0:  # one packed call: [unconditional objects, conditional objects]
                both = self.model(torch.cat([x, x]), torch.cat([t, t]) * self.T,
                                  torch.cat([torch.zeros_like(context), context]), torch.cat([counts, counts]))
                u, c = both[:N], both[N:]
                pred = u + w * (c - u)
            else:
                pred = self.model(x, t * self.T, context, counts)
            x = x + (ts[i] - ts[i + 1]) * pred
        return x

    def predict(self, inputs: dict, data_samples=None) -> List[BaseDataElement]:
        counts = inputs["num_parts"]
        g = torch.Generator().manual_seed(self.sample_seed)
        x = self.sample(counts, inputs["context"], inputs["latents"].shape[1], generator=g)
        out = list(data_samples) if data_samples is not None else [BaseDataElement() for _ in range(counts.numel())]
        for ds, p in zip(out, x.split(counts.tolist())):
            ds.pred_parts = p.cpu()
        return out

    def forward(self, inputs: dict, data_samples=None, mode: str = "tensor"):
        if mode == "loss":
            return self.loss(inputs)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        if mode == "tensor":
            return self.model(inputs["latents"], torch.zeros(inputs["num_parts"].numel()), inputs["context"],
                              inputs["num_parts"])
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


# ------------------------------------------------------------------------------------------------
# metric
# ------------------------------------------------------------------------------------------------
def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chamfer distance between point sets a (..., P, 3) and b (..., Q, 3): mean NN distance both ways."""
    d = torch.cdist(a.double(), b.double())
    return d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1)


def matched_part_chamfer(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean per-part Chamfer distance under the best assignment of predicted to ground-truth parts
    (exhaustive for n <= 7, Hungarian beyond)."""
    n = gt.shape[0]
    if pred.shape[0] != n:
        raise ValueError(f"{pred.shape[0]} predicted parts vs {n} ground-truth parts")
    cost = chamfer(pred[:, None], gt[None]).numpy()  # (n, n)
    if n <= 7:
        best = min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))
    else:
        from zoo._extras import requires_extra
        with requires_extra("train", "part matching"):
            from scipy.optimize import linear_sum_assignment
        r, c = linear_sum_assignment(cost)
        best = cost[r, c].sum()
    return float(best / n)


@METRICS.register_module()
class PartChamferMetric(BaseMetric):
    """``part_cd`` (matched per-part Chamfer), ``object_cd`` (union vs union), ``num_objects``."""

    default_prefix = "chamfer"

    def process(self, data_batch, data_samples: Sequence) -> None:
        for ds in data_samples:
            get = (lambda k: ds[k]) if isinstance(ds, dict) else (lambda k: getattr(ds, k))
            pred, gt = get("pred_parts").float().cpu(), get("gt_parts").float().cpu()
            self.results.append(dict(part=matched_part_chamfer(pred, gt),
                                     obj=float(chamfer(pred.reshape(-1, 3), gt.reshape(-1, 3)))))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        return dict(part_cd=float(np.mean([r["part"] for r in results])),
                    object_cd=float(np.mean([r["obj"] for r in results])), num_objects=len(results))
