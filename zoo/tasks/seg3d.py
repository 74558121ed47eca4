# SPDX-License-Identifier: Apache-2.0 AND BSD-2-Clause
# Derived from dbouget/mri_brain_tumor_segmentation (BSD-2-Clause; Copyright (c) 2021, dbouget); see THIRD_PARTY_NOTICES.md
"""3-D (MRI) segmentation glue for the Runner: NIfTI datasets, an embedded MRI set, the segmentation
model wrapper, Dice + patient-wise detection metrics, and NIfTI/PNG inference.

Registered in the zoo's mmengine registries on import (``zoo.tasks`` imports this module). Data flow:

* dataset item: ``dict(inputs=(1, D1, D2, D3) float tensor in [0, 1], data_samples=BaseDataElement)``;
  the sample holds ``gt_mask`` ((D1, D2, D3) long labels) and ``case_id``.
* :class:`Seg3dDataPreprocessor` stacks a batch; :class:`Segmentation3DModel` wraps any zoo 3-D
  segmenter (``timm.create_model`` name, e.g. ``agunet_3d_small``), trains it with soft Dice + cross
  entropy on every deep-supervision head and predicts ``pred_mask`` / ``pred_prob``.
* :class:`SegDetectionMetric` reports ``seg3d/dice`` (mean over cases with a lesion), ``seg3d/dice_tp``
  (over detected cases), and patient-wise ``seg3d/precision``, ``recall``, ``f1`` as in Bouget et al.

Preprocessing follows upstream's inference: resample to isotropic spacing (the finest voxel size),
clip intensities to percentiles, scale to [0, 1], resize to the network size (trilinear; masks nearest).
"""
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.structures import BaseDataElement
from torch.utils.data import Dataset

from zoo.engine import build_data_preprocessor, check_model_name
from zoo.registry import DATASETS, METRICS, MODELS

__all__ = ["load_nifti", "resample_isotropic", "normalize_intensity", "resize_volume", "preprocess_volume",
           "augment_volume", "NiftiSegDataset", "EmbeddedMRISegDataset", "make_embedded_mri_set",
           "Seg3dDataPreprocessor", "Segmentation3DModel", "SegDetectionMetric", "dice_score",
           "detection_stats", "soft_dice_loss", "infer_nifti", "NIFTI_EXTENSIONS"]

NIFTI_EXTENSIONS = (".nii", ".nii.gz")


# ------------------------------------------------------------------------------------------------
# volume preprocessing
# ------------------------------------------------------------------------------------------------
def load_nifti(path: str, frame: Optional[int] = None) -> Tuple[np.ndarray, Tuple[float, ...], np.ndarray]:
    """(float32 volume, voxel sizes of the 3 spatial axes, affine). A 4-D file needs ``frame``."""
    try:
        import nibabel as nib
    except ImportError as e:  # optional dependency
        raise ImportError("NIfTI input needs nibabel: pip install 'attention-zoo[medical]'") from e
    if not osp.isfile(path):
        raise FileNotFoundError(f"NIfTI file {path!r} does not exist")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        if frame is None:
            raise ValueError(f"{path!r} is 4-D {data.shape}; pick a volume with frame=0..{data.shape[3] - 1}")
        data = data[..., frame]
    if data.ndim != 3:
        raise ValueError(f"{path!r}: expected a 3-D volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, zooms, np.asarray(img.affine)


def resize_volume(vol: Union[np.ndarray, torch.Tensor], size: Sequence[int], is_mask: bool = False) -> torch.Tensor:
    """Resize a (D1, D2, D3) volume: trilinear for intensities, nearest for label masks."""
    t = torch.as_tensor(np.ascontiguousarray(vol) if isinstance(vol, np.ndarray) else vol)
    size = tuple(int(s) for s in size)
    if tuple(t.shape) == size:
        return t.clone()
    x = t[None, None].float()
    if is_mask:
        return F.interpolate(x, size=size, mode="nearest")[0, 0].to(t.dtype)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]


def resample_isotropic(vol: np.ndarray, zooms: Sequence[float], spacing: Optional[float] = None,
                       is_mask: bool = False) -> torch.Tensor:
    """Resample to cubic voxels of ``spacing`` mm (default: the finest of ``zooms``, as upstream)."""
    spacing = float(spacing or min(zooms))
    size = [max(1, int(round(s * z / spacing))) for s, z in zip(vol.shape, zooms)]
    return resize_volume(vol, size, is_mask)


def normalize_intensity(vol: torch.Tensor, clip: Tuple[float, float] = (0.0, 99.5)) -> torch.Tensor:
    """Clip to the given percentiles and scale to [0, 1] (a constant volume becomes zeros)."""
    lo, hi = np.percentile(vol.numpy(), clip)
    v = vol.clamp(float(lo), float(hi))
    return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)


def preprocess_volume(vol: np.ndarray, zooms: Sequence[float], size: Optional[Sequence[int]] = None,
                      clip: Tuple[float, float] = (0.0, 99.5)) -> torch.Tensor:
    """Upstream's chain: isotropic resampling -> percentile clip -> [0, 1] -> resize to ``size``."""
    v = normalize_intensity(resample_isotropic(vol, zooms), clip)
    return resize_volume(v, size) if size is not None else v


def augment_volume(img: torch.Tensor, mask: torch.Tensor, rng: np.random.RandomState, flip_prob: float = 0.5,
                   intensity: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random flips of each axis and a small gain/offset/gamma change; ``img`` (C, D1, D2, D3)."""
    for ax in range(3):
        if rng.rand() < flip_prob:
            img, mask = img.flip(1 + ax), mask.flip(ax)
    if intensity > 0:
        gain = 1.0 + rng.uniform(-intensity, intensity)
        offset = rng.uniform(-intensity, intensity) * 0.5
        gamma = float(np.exp(rng.uniform(-intensity, intensity)))
        img = (img.clamp(0, 1) ** gamma * gain + offset).clamp(0, 1)
    return img.contiguous(), mask.contiguous()


def _item(img: torch.Tensor, mask: torch.Tensor, case_id: str, **meta) -> dict:
    ds = BaseDataElement(metainfo=dict(case_id=case_id, img_shape=tuple(img.shape[-3:]), **meta))
    ds.gt_mask = mask.long()
    return dict(inputs=img.float(), data_samples=ds)


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def _strip_ext(name: str) -> str:
    for ext in NIFTI_EXTENSIONS[::-1]:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


@DATASETS.register_module()
class NiftiSegDataset(Dataset):
    """NIfTI volumes with label masks: ``data_root/<split>/images/<case>.nii[.gz]`` and
    ``data_root/<split>/labels/<case>.nii[.gz]`` (same case name; labels 0 = background).

    Each volume is preprocessed like upstream (:func:`preprocess_volume`) to ``size``; masks are
    resampled with nearest neighbour. ``augment`` (training) applies :func:`augment_volume`.
    """

    def __init__(self, data_root: str, split: str = "train", size: Sequence[int] = (128, 128, 144),
                 clip: Tuple[float, float] = (0.0, 99.5), augment: bool = False, flip_prob: float = 0.5,
                 intensity: float = 0.1, num_classes: int = 2, cache: bool = True, seed: int = 0):
        root = osp.join(str(data_root), split)
        img_dir, lbl_dir = osp.join(root, "images"), osp.join(root, "labels")
        if not osp.isdir(img_dir) or not osp.isdir(lbl_dir):
            raise FileNotFoundError(f"NIfTI dataset: expected {img_dir!r} and {lbl_dir!r} (case files with the "
                                    f"same names in both); set data_root in the config")
        imgs = sorted(f for f in os.listdir(img_dir) if f.endswith(NIFTI_EXTENSIONS))
        if not imgs:
            raise FileNotFoundError(f"no .nii/.nii.gz files in {img_dir!r}")
        labels = {_strip_ext(f): f for f in os.listdir(lbl_dir) if f.endswith(NIFTI_EXTENSIONS)}
        missing = [f for f in imgs if _strip_ext(f) not in labels]
        if missing:
            raise FileNotFoundError(f"no label file in {lbl_dir!r} for {missing[:5]}")
        self.cases = [(_strip_ext(f), osp.join(img_dir, f), osp.join(lbl_dir, labels[_strip_ext(f)])) for f in imgs]
        if len(size) != 3:
            raise ValueError(f"size must be 3 voxel counts (D1, D2, D3), got {size}")
        self.size, self.clip, self.num_classes = tuple(int(s) for s in size), tuple(clip), int(num_classes)
        self.augment, self.flip_prob, self.intensity = bool(augment), float(flip_prob), float(intensity)
        self.cache = {} if cache else None
        self.rng = np.random.RandomState(seed)

    @property
    def metainfo(self) -> dict:
        return dict(classes=tuple(str(i) for i in range(self.num_classes)))

    def __len__(self) -> int:
        return len(self.cases)

    def _load(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None and idx in self.cache:
            return self.cache[idx]
        case, ip, lp = self.cases[idx]
        vol, zooms, _ = load_nifti(ip)
        lab, lzooms, _ = load_nifti(lp)
        if lab.shape != vol.shape:
            raise ValueError(f"case {case!r}: label shape {lab.shape} != image shape {vol.shape}")
        img = preprocess_volume(vol, zooms, self.size, self.clip)[None]
        mask = resize_volume(resample_isotropic(np.rint(lab).astype(np.int64), zooms, is_mask=True), self.size, True)
        if int(mask.max()) >= self.num_classes or int(mask.min()) < 0:
            raise ValueError(f"case {case!r}: labels {int(mask.min())}..{int(mask.max())} outside 0..{self.num_classes - 1}")
        out = (img, mask)
        if self.cache is not None:
            self.cache[idx] = out
        return out

    def __getitem__(self, idx: int) -> dict:
        img, mask = self._load(idx)
        if self.augment:
            img, mask = augment_volume(img, mask, self.rng, self.flip_prob, self.intensity)
        return _item(img, mask, self.cases[idx][0])


# The real MRI volumes nibabel ships for its tests: (file, frames used)
_NIBABEL_VOLUMES = (("anatomical.nii", (None,)), ("example4d.nii.gz", (0, 1)),
                    ("reoriented_anat_moved.nii", (None,)), ("example_nifti2.nii.gz", (0, 1)))
_EMBEDDED_VERSION = 1


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(2 * sigma))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    y = x[None, None]
    for ax in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + ax] = -1
        pad = [0] * 6
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), g.view(shape))
    return y[0, 0]


def make_embedded_mri_set(num: int, size: int = 32, seed: int = 0, empty_fraction: float = 0.15,
                          max_lesions: int = 2) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic 3-D segmentation samples from nibabel's real MRI volumes with synthetic lesions.

    Each sample: one of the shipped volumes (isotropically resampled, clipped, [0, 1]), a random
    crop of 60-100 % of each axis, random axis flips and permutation, resized to ``size``^3, scaled
    to about [0, 0.75] under a smooth random bias field; then 0..``max_lesions`` enhancing ellipsoids
    (intensity 0.8-0.95 with texture, radii 2.5-6 voxels at any size, soft 1-voxel rim) placed inside
    the head. The mask is the ellipsoid interior (blend weight > half) — known exactly. Returns ``[(image (1, s, s, s), mask (s, s, s) long)]``.
    """
    from zoo._extras import requires_extra
    with requires_extra("medical", "the embedded NIfTI volumes"):
        from nibabel.testing import data_path

    bases = []
    for fname, frames in _NIBABEL_VOLUMES:
        for fr in frames:
            vol, zooms, _ = load_nifti(osp.join(data_path, fname), fr)
            bases.append(normalize_intensity(resample_isotropic(vol, zooms), (1.0, 99.0)))
    rng = np.random.RandomState(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    out = []
    for _ in range(num):
        base = bases[rng.randint(len(bases))]
        sl = []
        for s in base.shape:
            ext = max(4, int(round(s * rng.uniform(0.6, 1.0))))
            ext = min(ext, s)
            start = rng.randint(0, s - ext + 1)
            sl.append(slice(start, start + ext))
        v = base[tuple(sl)]
        v = v.permute(*[int(a) for a in rng.permutation(3)])
        for ax in range(3):
            if rng.rand() < 0.5:
                v = v.flip(ax)
        v = resize_volume(v, (size,) * 3)
        bias = resize_volume(torch.from_numpy(rng.randn(3, 3, 3).astype(np.float32)), (size,) * 3)
        v = (0.75 * v * (1.0 + 0.15 * bias)).clamp(0, 1)  # tissue to ~[0, 0.75], smooth bias field
        head = v > 0.15
        mask = torch.zeros(size, size, size, dtype=torch.long)
        n_les = 0 if rng.rand() < empty_fraction else int(rng.randint(1, max_lesions + 1))
        cand = torch.nonzero(head) if head.any() else torch.nonzero(torch.ones_like(head))
        for _l in range(n_les):
            c = cand[rng.randint(len(cand))].float()
            radii = torch.tensor(rng.uniform(2.5, 6.0, size=3), dtype=torch.float32)
            d = torch.sqrt((((grid - c.view(3, 1, 1, 1)) / radii.view(3, 1, 1, 1)) ** 2).sum(0))
            weight = (1.5 - d).clamp(0, 1)  # 1 inside d <= 0.5, soft rim to d = 1.5
            level = rng.uniform(0.8, 0.95)  # enhancing lesion: brighter than the (scaled) tissue
            tex = 0.1 * _smooth(torch.from_numpy(rng.randn(size, size, size).astype(np.float32)), 1.0)
            v = (v * (1 - weight) + weight * (level + tex)).clamp(0, 1)
            mask[weight > 0.5] = 1
        v = (v + 0.02 * torch.from_numpy(rng.randn(size, size, size).astype(np.float32))).clamp(0, 1)
        out.append((v[None].contiguous(), mask))
    return out


@DATASETS.register_module()
class EmbeddedMRISegDataset(Dataset):
    """The embedded 3-D set (:func:`make_embedded_mri_set`), built in memory on first use; needs
    only nibabel (its wheel ships the MRI volumes). Train and val use different seeds."""

    def __init__(self, split: str = "train", size: int = 32, num_samples: Optional[int] = None, seed: int = 0,
                 augment: bool = False, flip_prob: float = 0.5, intensity: float = 0.1,
                 empty_fraction: float = 0.15):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if int(size) < 16:
            raise ValueError(f"size must be >= 16 voxels, got {size}")
        num = int(num_samples) if num_samples is not None else (96 if split == "train" else 24)
        self.samples = make_embedded_mri_set(num, int(size), seed=seed * 2 + (0 if split == "train" else 1) + 1000,
                                             empty_fraction=empty_fraction)
        self.split = split
        self.augment = bool(augment) and split == "train"
        self.flip_prob, self.intensity = float(flip_prob), float(intensity)
        self.rng = np.random.RandomState(seed)

    @property
    def metainfo(self) -> dict:
        return dict(classes=("background", "lesion"), version=_EMBEDDED_VERSION)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        img, mask = self.samples[idx]
        if self.augment:
            img, mask = augment_volume(img, mask, self.rng, self.flip_prob, self.intensity)
        return _item(img, mask, f"{self.split}_{idx:04d}")


# ------------------------------------------------------------------------------------------------
# preprocessor, losses and model wrapper
# ------------------------------------------------------------------------------------------------
@MODELS.register_module()
class Seg3dDataPreprocessor(BaseDataPreprocessor):
    """Stacks (C, D1, D2, D3) volumes into a batch (all must share one size) and moves it to the device."""

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        if isinstance(inputs, (list, tuple)):
            shapes = {tuple(x.shape) for x in inputs}
            if len(shapes) != 1:
                raise ValueError(f"Seg3dDataPreprocessor: volumes in a batch must share one shape, got {sorted(shapes)}")
            inputs = torch.stack(list(inputs))
        if inputs.ndim != 5:
            raise ValueError(f"expected (B, C, D1, D2, D3) volumes, got shape {tuple(inputs.shape)}")
        return dict(inputs=inputs.float(), data_samples=data.get("data_samples"))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (batch-pooled), from logits (B, K, ...)."""
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice[1:].mean() if logits.shape[1] > 1 else 1.0 - dice.mean()


@MODELS.register_module()
class Segmentation3DModel(BaseModel):
    """A zoo 3-D segmenter (``timm.create_model`` name) as an mmengine model.

    Loss: ``dice_weight`` x soft Dice (foreground classes) + ``ce_weight`` x cross entropy on every
    head's logits (coarse heads up-sampled to the label size), weighted ``ds_weights[j]`` (default
    1, 1/2, 1/4 ..., finest first; upstream's weighting is not released). Prediction: softmax of
    the finest head; binary tasks threshold the foreground probability at ``threshold`` (upstream
    default 0.4), multi-class take the argmax.
    """

    def __init__(self, model_name: str, pretrained: bool = False, num_classes: int = 2,
                 model_kwargs: Optional[dict] = None, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 ds_weights: Optional[Sequence[float]] = None, threshold: float = 0.4,
                 grad_checkpointing: bool = False, data_preprocessor: Optional[Union[dict, nn.Module]] = None,
                 init_cfg: Optional[dict] = None):
        import timm

        import zoo  # noqa: F401

        check_model_name(model_name)
        super().__init__(data_preprocessor=build_data_preprocessor(data_preprocessor, "Seg3dDataPreprocessor"), init_cfg=init_cfg)
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        self.model_name = model_name
        self.num_classes = int(num_classes)
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                       **(model_kwargs or {}))
        if not hasattr(self.model, "forward_all"):
            raise TypeError(f"{model_name!r} is not a zoo 3-D segmenter (no forward_all())")
        self.model.is_init = True  # mmengine's init_weights would re-initialise it (mmengine#1335)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.ds_weights = tuple(float(w) for w in ds_weights) if ds_weights is not None else None
        self.threshold = float(threshold)

    @staticmethod
    def _masks(data_samples, device) -> torch.Tensor:
        if data_samples is None or any("gt_mask" not in ds for ds in data_samples):
            raise ValueError("mode='loss' needs data_samples with a gt_mask field")
        return torch.stack([ds.gt_mask for ds in data_samples]).to(device).long()

    def loss(self, inputs: torch.Tensor, data_samples) -> Dict[str, torch.Tensor]:
        target = self._masks(data_samples, inputs.device)
        outs = self.model.forward_all(inputs)
        weights = self.ds_weights or tuple(0.5 ** j for j in range(len(outs)))
        if len(weights) < len(outs):
            raise ValueError(f"ds_weights has {len(weights)} entries for {len(outs)} heads")
        total = sum(weights[:len(outs)])
        dice = ce = 0.0
        for w, logits in zip(weights, outs):
            if logits.shape[2:] != target.shape[1:]:
                logits = F.interpolate(logits, size=target.shape[1:], mode="trilinear", align_corners=False)
            dice = dice + w / total * soft_dice_loss(logits, target)
            ce = ce + w / total * F.cross_entropy(logits.float(), target)
        return dict(loss_dice=self.dice_weight * dice, loss_ce=self.ce_weight * ce)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, data_samples=None) -> List[BaseDataElement]:
        prob = self.model.predict_proba(inputs)
        if self.num_classes == 2:
            pred = (prob[:, 1] >= self.threshold).long()
        else:
            pred = prob.argmax(1)
        if data_samples is None:
            data_samples = [BaseDataElement() for _ in range(inputs.shape[0])]
        for ds, p, m in zip(data_samples, prob, pred):
            ds.pred_mask = m.cpu()
            ds.pred_prob = p[1:].cpu() if self.num_classes == 2 else p.cpu()
        return data_samples

    def forward(self, inputs: torch.Tensor, data_samples=None, mode: str = "tensor"):
        if mode == "tensor":
            return self.model(inputs)
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def dice_score(pred: Union[np.ndarray, torch.Tensor], gt: Union[np.ndarray, torch.Tensor],
               empty: float = 1.0) -> float:
    """Dice of two binary masks; ``empty`` when both are empty."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    s = p.sum() + g.sum()
    return float(empty) if s == 0 else float(2.0 * np.logical_and(p, g).sum() / s)


def detection_stats(dices: Sequence[float], has_gt: Sequence[bool], has_pred: Sequence[bool],
                    dice_threshold: float = 0.1) -> Dict[str, float]:
    """Patient-wise detection: a case with a lesion is a true positive when its Dice reaches
    ``dice_threshold``, else a false negative (and a false positive too if something else was
    predicted); a case without a lesion and with a prediction is a false positive."""
    tp = fp = fn = 0
    for d, g, p in zip(dices, has_gt, has_pred):
        if g:
            if d >= dice_threshold:
                tp += 1
            else:
                fn += 1
                fp += int(p)
        elif p:
            fp += 1
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(tp=tp, fp=fp, fn=fn, precision=precision, recall=recall, f1=f1)


@METRICS.register_module()
class SegDetectionMetric(BaseMetric):
    """Dice and patient-wise detection metrics of the paper, foreground = every class > 0.

    Reports (prefix ``seg3d``): ``dice`` (mean over cases with a lesion), ``dice_tp`` (mean over
    detected cases), ``precision``, ``recall``, ``f1`` (patient-wise, :func:`detection_stats`) and
    ``dice_all`` (every case; empty-vs-empty counts 1). ``min_voxels``: predictions smaller than
    this count as empty.
    """

    default_prefix = "seg3d"

    def __init__(self, dice_threshold: float = 0.1, min_voxels: int = 1, collect_device: str = "cpu",
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not 0.0 <= dice_threshold <= 1.0:
            raise ValueError(f"dice_threshold must be in [0, 1], got {dice_threshold}")
        self.dice_threshold, self.min_voxels = float(dice_threshold), int(min_voxels)

    def process(self, data_batch, data_samples: Sequence) -> None:
        def get(x, name):
            return x[name] if isinstance(x, dict) else getattr(x, name)

        for ds in data_samples:
            pred = torch.as_tensor(get(ds, "pred_mask")).cpu().numpy() > 0
            gt = torch.as_tensor(get(ds, "gt_mask")).cpu().numpy() > 0
            if pred.shape != gt.shape:
                raise ValueError(f"pred_mask {pred.shape} and gt_mask {gt.shape} differ in shape")
            self.results.append((dice_score(pred, gt), bool(gt.any()), int(pred.sum()) >= self.min_voxels))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        dices = [r[0] for r in results]
        has_gt = [r[1] for r in results]
        has_pred = [r[2] for r in results]
        stats = detection_stats(dices, has_gt, has_pred, self.dice_threshold)
        pos = [d for d, g in zip(dices, has_gt) if g]
        tps = [d for d in pos if d >= self.dice_threshold]
        out = dict(dice=float(np.mean(pos)) if pos else float("nan"),
                   dice_tp=float(np.mean(tps)) if tps else 0.0,
                   dice_all=float(np.mean(dices)) if dices else float("nan"),
                   precision=stats["precision"], recall=stats["recall"], f1=stats["f1"])
        print_log(f"seg3d: {len(results)} cases, TP {stats['tp']} FP {stats['fp']} FN {stats['fn']}", logger="current")
        return out


# ------------------------------------------------------------------------------------------------
# inference: NIfTI in, NIfTI mask + PNG overlay out
# ------------------------------------------------------------------------------------------------
def _overlay_png(vol: np.ndarray, mask: np.ndarray, path: str) -> None:
    """The axial (last-axis) slice with the most lesion voxels (else the middle), lesion in red."""
    from PIL import Image

    area = mask.reshape(-1, mask.shape[-1]).sum(0)
    z = int(area.argmax()) if area.max() > 0 else mask.shape[-1] // 2
    sl = vol[..., z].astype(np.float32)
    lo, hi = np.percentile(sl, (1, 99))
    g = np.clip((sl - lo) / (hi - lo + 1e-8), 0, 1)
    rgb = np.stack([g, g, g], -1)
    m = mask[..., z] > 0
    rgb[m] = 0.5 * rgb[m] + 0.5 * np.array([1.0, 0.0, 0.0])
    Image.fromarray((np.rot90(rgb) * 255).round().astype(np.uint8)).save(path)


def infer_nifti(model_or_ckpt: Union[str, nn.Module], inputs: Sequence[str], out_dir: str,
                model_name: Optional[str] = None, size: Optional[Sequence[int]] = None, threshold: float = 0.4,
                clip: Tuple[float, float] = (0.0, 99.5), device: str = "cpu", png: bool = True,
                verbose: bool = True) -> List[dict]:
    """Segment NIfTI volumes; writes ``<case>_mask.nii.gz`` (uint8 labels on the input's grid and
    affine) and ``<case>_overlay.png`` under ``out_dir``. Returns one dict per file (paths, lesion
    volume in ml, max foreground probability).

    ``model_or_ckpt``: a module, a tools/train.py checkpoint, an exported .safetensors (with
    ``model_name``) or a zoo model name with weights. ``size``: network input size (default: the
    checkpoint's dataset size, else the cfg's ``test_input_size``).
    """
    from zoo._extras import requires_extra
    with requires_extra("medical", "NIfTI inference"):
        import nibabel as nib

    files = []
    for item in inputs:
        if osp.isdir(item):
            files += sorted(osp.join(item, f) for f in os.listdir(item) if f.endswith(NIFTI_EXTENSIONS))
        elif osp.isfile(item) and item.endswith(NIFTI_EXTENSIONS):
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a .nii/.nii.gz file nor a folder holding them")
    if not files:
        raise FileNotFoundError(f"no .nii/.nii.gz files in {list(inputs)}")
    if isinstance(model_or_ckpt, nn.Module):
        model, info = model_or_ckpt.eval().to(device), {}
    else:
        from zoo.engine.inference import load_model
        model, info = load_model(model_or_ckpt, model_name, None, device)
    if not hasattr(model, "predict_proba"):
        raise TypeError("infer_nifti needs a zoo 3-D segmenter (with predict_proba())")
    if size is None:
        ds = info.get("dataset_cfg") or {}
        s = ds.get("size")
        if s is not None:
            size = (s,) * 3 if isinstance(s, int) else tuple(s)
        else:
            size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("test_input_size") or (1, 128, 128, 144))[1:]
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for f in files:
        img = nib.load(f)
        vol, zooms, affine = load_nifti(f, 0 if len(img.shape) == 4 else None)
        iso = normalize_intensity(resample_isotropic(vol, zooms), clip)
        x = resize_volume(iso, size)[None, None].to(device)
        with torch.no_grad():
            prob = model.predict_proba(x)[0].cpu()
        fg = prob[1:].sum(0) if prob.shape[0] > 2 else prob[1]
        fg = resize_volume(resize_volume(fg, iso.shape), vol.shape)
        if prob.shape[0] > 2:
            lab = resize_volume(prob.argmax(0), vol.shape, is_mask=True).numpy().astype(np.uint8)
        else:
            lab = (fg.numpy() >= threshold).astype(np.uint8)
        case = _strip_ext(osp.basename(f))
        mpath = osp.join(out_dir, f"{case}_mask.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), mpath)
        rec = dict(file=f, mask=mpath, lesion_ml=float((lab > 0).sum() * np.prod(zooms) / 1000.0),
                   max_prob=float(fg.max()))
        if png:
            rec["overlay"] = osp.join(out_dir, f"{case}_overlay.png")
            _overlay_png(vol, lab, rec["overlay"])
        if verbose:
            print(f"{f}: lesion {rec['lesion_ml']:.2f} ml (max p {rec['max_prob']:.2f}) -> {mpath}")
        results.append(rec)
    return results
