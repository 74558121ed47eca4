"""Object detection glue for the Runner: COCO-json datasets, padding preprocessor, detector wrapper,
COCO metric (pycocotools) and an embedded, deterministic detection set built from real pixels.

Registered in the zoo's mmengine registries on import. Data flow:

* dataset item: ``dict(inputs=CHW uint8 tensor, data_samples=BaseDataElement)``; the sample holds
  ``img_id``, ``ori_shape`` (h, w of the file), ``img_shape`` (after resize), ``scale_factor``
  (sx, sy), ``flip`` and ``gt_instances`` (``bboxes`` xyxy pixels of the resized image, ``labels``).
* :class:`DetDataPreprocessor` stacks a batch into one padded tensor (bottom/right padding to a
  multiple of ``size_divisor``) and normalises; the padding mask follows from ``img_shape``.
* :class:`TimmDetector` predicts ``pred_instances`` (``bboxes`` xyxy in pixels of the original
  image, ``scores``, ``labels``).
* :class:`CocoMetric` reports the 12 COCO bbox stats as ``coco/bbox_mAP`` ...
* :func:`detect` (tools/infer.py's ``'detection'`` output): boxes above a score threshold, drawn on
  the image.
"""
import contextlib
import io
import json
import logging
import os
import os.path as osp
import random
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.structures import BaseDataElement, InstanceData
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from zoo.engine import build_data_preprocessor, check_model_name
from zoo.engine.inference import class_names, register_output_handler
from zoo.registry import DATASETS, METRICS, MODELS

__all__ = ["CocoDetection", "DigitsDetection", "make_digits_detection_set", "DetDataPreprocessor",
           "TimmDetector", "CocoMetric", "COCO_STAT_NAMES", "resize_boxes", "flip_boxes", "target_size",
           "detect", "draw_detections", "resize_settings"]

COCO_STAT_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
                   "bbox_AR_1", "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# box-aware transforms (boxes xyxy in pixels)
# ------------------------------------------------------------------------------------------------
def resize_boxes(boxes: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Horizontal flip of xyxy boxes in an image ``width`` pixels wide."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def _resize_image(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if tuple(img.shape[-2:]) == (h, w):
        return img
    out = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def target_size(h: int, w: int, short: int, max_size: Optional[int]) -> Tuple[int, int]:
    """DETR resize: shorter side to ``short`` unless the longer side would exceed ``max_size``."""
    s = short / min(h, w)
    if max_size is not None and max(h, w) * s > max_size:
        s = max_size / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
@DATASETS.register_module()
class CocoDetection(Dataset):
    """A COCO-json detection dataset.

    Args:
        data_root: folder holding ``ann_file`` and ``img_prefix`` (relative paths are joined to it).
        ann_file: COCO instances json.
        img_prefix: image folder.
        scales: shorter-side sizes; training picks one at random, testing uses the last.
        max_size: cap on the longer side (None: no cap).
        letterbox: if set, resize to fit a ``letterbox`` x ``letterbox`` square instead (aspect kept;
            the preprocessor pads the rest), overriding ``scales``.
        flip_prob: horizontal flip probability (training).
        test_mode: no augmentation, keep images without annotations.
        filter_empty: drop training images without (non-crowd) boxes.
    """

    def __init__(self, data_root: str, ann_file: str = "annotations/instances_train2017.json",
                 img_prefix: str = "train2017", scales: Sequence[int] = (800,), max_size: Optional[int] = 1333,
                 letterbox: Optional[int] = None, flip_prob: float = 0.0, test_mode: bool = False,
                 filter_empty: bool = False, max_samples: Optional[int] = None):
        from zoo._extras import requires_extra
        with requires_extra("detection", "CocoDetection"):
            from pycocotools.coco import COCO

        if not data_root or not osp.isdir(data_root):
            raise FileNotFoundError(
                f"COCO data_root {data_root!r} does not exist. Point `data_root` (config variable) at a folder "
                "holding annotations/instances_{train,val}2017.json and the train2017/ val2017/ image folders "
                "(https://cocodataset.org/#download).")
        self.data_root = data_root
        self.ann_file = ann_file if osp.isabs(ann_file) else osp.join(data_root, ann_file)
        self.img_prefix = img_prefix if osp.isabs(img_prefix) else osp.join(data_root, img_prefix)
        if not osp.isfile(self.ann_file):
            raise FileNotFoundError(f"annotation file {self.ann_file!r} not found (data_root={data_root!r})")
        if not scales:
            raise ValueError("scales must list at least one shorter-side size")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.scales = tuple(int(s) for s in scales)
        self.max_size = max_size
        self.letterbox = letterbox
        self.flip_prob = 0.0 if test_mode else float(flip_prob)
        self.test_mode = test_mode
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(self.ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat2label = {c: i for i, c in enumerate(self.cat_ids)}
        self.classes = tuple(c["name"] for c in self.coco.loadCats(self.cat_ids))
        ids = sorted(self.coco.getImgIds())
        if filter_empty and not test_mode:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        if max_samples is not None:
            ids = ids[:int(max_samples)]
        self.img_ids = ids

    @property
    def metainfo(self) -> dict:
        return dict(classes=self.classes, cat_ids=tuple(self.cat_ids), ann_file=self.ann_file)

    def __len__(self) -> int:
        return len(self.img_ids)

    def _load(self, info: dict) -> torch.Tensor:
        from PIL import Image

        path = osp.join(self.img_prefix, info["file_name"])
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def _annotations(self, img_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        boxes, labels = [], []
        for a in self.coco.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat2label[a["category_id"]])
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64))

    def __getitem__(self, idx: int) -> dict:
        img_id = self.img_ids[idx]
        info = self.coco.imgs[img_id]
        img = self._load(info)
        h0, w0 = img.shape[-2:]
        boxes, labels = self._annotations(img_id)
        if self.letterbox:
            s = self.letterbox / max(h0, w0)
            h, w = max(1, int(round(h0 * s))), max(1, int(round(w0 * s)))
        else:
            short = random.choice(self.scales) if not self.test_mode else self.scales[-1]
            h, w = target_size(h0, w0, short, self.max_size)
        img = _resize_image(img, h, w)
        sx, sy = w / w0, h / h0
        boxes = resize_boxes(boxes, sx, sy)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        flip = self.flip_prob > 0 and random.random() < self.flip_prob
        if flip:
            img = img.flip(-1)
            boxes = flip_boxes(boxes, w)
        ds = BaseDataElement(metainfo=dict(img_id=img_id, ori_shape=(h0, w0), img_shape=(h, w),
                                           scale_factor=(sx, sy), flip=flip))
        ds.gt_instances = InstanceData(bboxes=boxes, labels=labels)
        return dict(inputs=img, data_samples=ds)


_DIGITS_VERSION = 1


def make_digits_detection_set(root: str, num_train: int = 240, num_val: int = 60, seed: int = 0,
                              sizes: Sequence[int] = (96, 112, 128, 144), max_objects: int = 3,
                              empty_fraction: float = 0.05) -> Dict[str, str]:
    """Write a small real-pixel detection set: scikit-learn's handwritten 8x8 digits (shipped in its
    wheel), upscaled 2.5-5x and pasted without overlap on noisy canvases of varied sizes.

    Deterministic in ``seed``. Train and val use disjoint digit images. Boxes are the ink extent of
    each pasted digit; classes are the digit values. Writes ``{root}/{split}.json`` (COCO) and PNGs
    under ``{root}/{split}/``; returns the json paths.
    """
    from PIL import Image

    from zoo._extras import requires_extra
    with requires_extra("train", "the embedded digits detection data"):
        from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = digits.images.astype(np.float32) / 16.0
    targets = digits.target
    order = np.random.RandomState(seed).permutation(len(imgs))
    pools = {"train": order[: int(len(order) * 0.8)], "val": order[int(len(order) * 0.8):]}
    out = {}
    categories = [dict(id=i + 1, name=str(i), supercategory="digit") for i in range(10)]
    for split, n_img, sseed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        rng = np.random.RandomState(1000 + sseed)
        pool = pools[split]
        img_dir = osp.join(root, split)
        os.makedirs(img_dir, exist_ok=True)
        images, anns = [], []
        for i in range(n_img):
            H, W = int(rng.choice(sizes)), int(rng.choice(sizes))
            yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
            base = 0.15 + 0.1 * np.sin(xx / (7 + 5 * rng.rand()) + rng.rand() * 6) * np.cos(yy / (9 + 5 * rng.rand()))
            canvas = np.clip(base + 0.04 * rng.randn(H, W), 0, 1)[..., None].repeat(3, -1)
            n_obj = 0 if rng.rand() < empty_fraction else int(rng.randint(1, max_objects + 1))
            placed = []
            for _ in range(n_obj):
                d = int(pool[rng.randint(len(pool))])
                digit = imgs[d]
                scale = 2.5 + 2.5 * rng.rand()
                size = int(round(8 * scale))
                if size >= min(H, W) - 2:
                    continue
                patch = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize(
                    (size, size), Image.BILINEAR), dtype=np.float32) / 255.0
                ink_r = np.where(patch.max(1) > 0.2)[0]
                ink_c = np.where(patch.max(0) > 0.2)[0]
                if len(ink_r) == 0 or len(ink_c) == 0:
                    continue
                for _try in range(20):
                    y0, x0 = int(rng.randint(0, H - size)), int(rng.randint(0, W - size))
                    box = (x0 + ink_c[0], y0 + ink_r[0], x0 + ink_c[-1] + 1, y0 + ink_r[-1] + 1)
                    if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1]
                           for b in placed):
                        break
                else:
                    continue
                colour = 0.6 + 0.4 * rng.rand(3)
                region = canvas[y0:y0 + size, x0:x0 + size]
                canvas[y0:y0 + size, x0:x0 + size] = np.maximum(region, patch[..., None] * colour)
                placed.append(box)
                bw, bh = box[2] - box[0], box[3] - box[1]
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(targets[d]) + 1,
                                 bbox=[float(box[0]), float(box[1]), float(bw), float(bh)],
                                 area=float(bw * bh), iscrowd=0))
            fname = f"{i:05d}.png"
            Image.fromarray((canvas * 255).round().astype(np.uint8)).save(osp.join(img_dir, fname))
            images.append(dict(id=i + 1, file_name=fname, height=H, width=W))
        path = osp.join(root, f"{split}.json")
        with open(path, "w") as f:
            json.dump(dict(info=dict(description=f"zoo embedded digits detection v{_DIGITS_VERSION}"),
                           images=images, annotations=anns, categories=categories), f)
        out[split] = path
    return out


def _default_digits_root() -> str:
    base = os.environ.get("ZOO_DATA_DIR") or osp.join(osp.expanduser("~"), ".cache", "zoo")
    return osp.join(base, f"digits_det_v{_DIGITS_VERSION}")


def ensure_digits_detection_set(root: Optional[str] = None, **kwargs) -> str:
    """Generate the embedded set once (atomically) and return its folder."""
    root = root or _default_digits_root()
    if osp.isfile(osp.join(root, "val.json")) and osp.isfile(osp.join(root, "train.json")):
        return root
    parent = osp.dirname(osp.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits_det_", dir=parent)
    make_digits_detection_set(tmp, **kwargs)
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@DATASETS.register_module()
class DigitsDetection(CocoDetection):
    """The embedded digits detection set (see :func:`make_digits_detection_set`), generated on
    first use under ``data_root`` (default ``$ZOO_DATA_DIR`` or ``~/.cache/zoo``)."""

    def __init__(self, split: str = "train", data_root: Optional[str] = None, scales: Sequence[int] = (128,),
                 max_size: Optional[int] = 192, letterbox: Optional[int] = None, flip_prob: float = 0.0,
                 test_mode: Optional[bool] = None, max_samples: Optional[int] = None, **gen_kwargs):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = ensure_digits_detection_set(data_root, **gen_kwargs)
        super().__init__(root, f"{split}.json", split, scales=scales, max_size=max_size, letterbox=letterbox,
                         flip_prob=flip_prob, test_mode=(split == "val") if test_mode is None else test_mode,
                         max_samples=max_samples)


# ------------------------------------------------------------------------------------------------
# preprocessor and model wrapper
# ------------------------------------------------------------------------------------------------
@MODELS.register_module()
class DetDataPreprocessor(BaseDataPreprocessor):
    """Pads a list of CHW images at the bottom/right to one (B, C, H, W) batch (H, W rounded up to
    ``size_divisor``), normalises on the device (timm 0..1 mean/std convention)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 size_divisor: int = 32, pad_value: float = 0.0, non_blocking: bool = False):
        super().__init__(non_blocking=non_blocking)
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.size_divisor = int(size_divisor)
        self.pad_value = pad_value

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = list(inputs)
        if not inputs:
            raise ValueError("DetDataPreprocessor got an empty batch")
        d = max(1, self.size_divisor)
        H = -(-max(int(x.shape[-2]) for x in inputs) // d) * d
        W = -(-max(int(x.shape[-1]) for x in inputs) // d) * d
        batch = []
        for x in inputs:
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            x = (x - self.mean) / self.std
            batch.append(F.pad(x, (0, W - x.shape[-1], 0, H - x.shape[-2]), value=self.pad_value))
        samples = data.get("data_samples")
        if samples is not None:
            for ds, x in zip(samples, inputs):
                if "img_shape" not in ds.metainfo:
                    ds.set_metainfo(dict(img_shape=tuple(x.shape[-2:])))
                ds.set_metainfo(dict(batch_input_shape=(H, W)))
        return dict(inputs=torch.stack(batch), data_samples=samples)


def padding_masks(data_samples, shape: Tuple[int, int], device) -> torch.Tensor:
    """(B, H, W) bool, True where a batch image is padding (from each sample's ``img_shape``)."""
    H, W = shape
    masks = torch.ones(len(data_samples), H, W, dtype=torch.bool, device=device)
    for i, ds in enumerate(data_samples):
        h, w = ds.metainfo["img_shape"]
        masks[i, :h, :w] = False
    return masks


@MODELS.register_module()
class TimmDetector(BaseModel):
    """A zoo detector (``timm.create_model`` name, e.g. ``focus_detr_r50``) as an mmengine model.

    The network must provide ``forward(images, masks, targets)``, ``postprocess(outputs, sizes)``
    and ``create_criterion(**criterion)``. Loss targets are the samples' ``gt_instances`` (boxes
    xyxy pixels of the resized image, normalised here to cxcywh of the valid area).
    """

    def __init__(self, model_name: str, pretrained: bool = False, num_classes: int = 80,
                 model_kwargs: Optional[dict] = None, criterion: Optional[dict] = None,
                 data_preprocessor: Optional[Union[dict, nn.Module]] = None, init_cfg: Optional[dict] = None):
        import timm

        import zoo  # noqa: F401

        check_model_name(model_name)
        super().__init__(data_preprocessor=build_data_preprocessor(data_preprocessor, "DetDataPreprocessor"), init_cfg=init_cfg)
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                       **(model_kwargs or {}))
        for need in ("postprocess", "create_criterion"):
            if not hasattr(self.model, need):
                raise TypeError(f"{model_name!r} is not a zoo detector (no {need}()); use TimmClassifier")
        # mmengine's init_weights would re-initialise children lacking this flag (mmengine#1335)
        self.model.is_init = True
        self.criterion = self.model.create_criterion(**(criterion or {}))

    @staticmethod
    def _targets(data_samples, device) -> Tuple[List[dict], List[Tuple[int, int]]]:
        from zoo.layers.detr_blocks import box_xyxy_to_cxcywh

        targets, sizes = [], []
        for ds in data_samples:
            h, w = ds.metainfo["img_shape"]
            gt = ds.gt_instances
            boxes = gt.bboxes.to(device).float()
            boxes = box_xyxy_to_cxcywh(boxes / torch.tensor([w, h, w, h], dtype=torch.float32, device=device))
            targets.append(dict(labels=gt.labels.to(device).long(), boxes=boxes))
            sizes.append((int(h), int(w)))
        return targets, sizes

    def forward(self, inputs: torch.Tensor, data_samples: Optional[List[BaseDataElement]] = None,
                mode: str = "tensor"):
        if mode not in ("tensor", "loss", "predict"):
            raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")
        masks = padding_masks(data_samples, inputs.shape[-2:], inputs.device) if data_samples else None
        if mode == "tensor":
            return self.model(inputs, masks)
        if mode == "loss":
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples with gt_instances")
            targets, sizes = self._targets(data_samples, inputs.device)
            outputs = self.model(inputs, masks, targets)
            return self.criterion(outputs, targets, sizes)
        return self.predict(inputs, data_samples, masks)

    @torch.no_grad()
    def predict(self, inputs, data_samples=None, masks=None) -> List[BaseDataElement]:
        if data_samples is None:
            data_samples = [BaseDataElement(metainfo=dict(img_shape=tuple(inputs.shape[-2:])))
                            for _ in range(inputs.shape[0])]
        outputs = self.model(inputs, masks)
        sizes = [tuple(ds.metainfo.get("img_shape", inputs.shape[-2:])) for ds in data_samples]
        results = self.model.postprocess(outputs, sizes)
        for ds, r, (h, w) in zip(data_samples, results, sizes):
            boxes = r["boxes"]
            if ds.metainfo.get("flip", False):
                boxes = flip_boxes(boxes, w)
            sx, sy = ds.metainfo.get("scale_factor", (1.0, 1.0))
            boxes = boxes / torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
            h0, w0 = ds.metainfo.get("ori_shape", (h, w))
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
            ds.pred_instances = InstanceData(bboxes=boxes, scores=r["scores"], labels=r["labels"])
        return data_samples


# ------------------------------------------------------------------------------------------------
# metric
# ------------------------------------------------------------------------------------------------
@METRICS.register_module()
class CocoMetric(BaseMetric):
    """COCO box AP/AR with pycocotools: the 12 standard stats as ``coco/bbox_mAP``, ``_50``, ``_75``,
    ``_s``, ``_m``, ``_l``, ``coco/bbox_AR_1``, ``_10``, ``_100``, ``_s``, ``_m``, ``_l``.

    Ground truth comes from ``ann_file`` (default: the dataset's ``metainfo['ann_file']``), else is
    rebuilt from the samples' ``gt_instances`` (mapped back to original-image pixels). No
    predictions at all gives zeros (pycocotools' ``loadRes`` raises on an empty list).
    """

    default_prefix = "coco"

    def __init__(self, ann_file: Optional[str] = None, max_dets: Sequence[int] = (1, 10, 100),
                 classwise: bool = False, collect_device: str = "cpu", prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if len(max_dets) != 3 or 100 not in max_dets:
            raise ValueError(f"max_dets must be three increasing numbers including 100 (pycocotools' AP "
                             f"uses maxDets=100), got {max_dets}")
        self.ann_file = ann_file
        self.max_dets = tuple(int(m) for m in max_dets)
        self.classwise = classwise

    def _names(self) -> Tuple[str, ...]:
        if self.max_dets == (1, 10, 100):
            return COCO_STAT_NAMES
        return COCO_STAT_NAMES[:6] + tuple(f"bbox_AR_{m}" for m in self.max_dets) + COCO_STAT_NAMES[9:]

    def process(self, data_batch, data_samples: Sequence) -> None:
        def get(x, name):
            return x[name] if isinstance(x, dict) else getattr(x, name)

        for ds in data_samples:  # the Evaluator hands over ``to_dict()`` copies; accept both
            meta = ds if isinstance(ds, dict) else ds.metainfo
            pred = get(ds, "pred_instances")
            rec = dict(img_id=int(meta["img_id"]), ori_shape=tuple(meta["ori_shape"]),
                       bboxes=torch.as_tensor(get(pred, "bboxes")).detach().float().cpu().numpy(),
                       scores=torch.as_tensor(get(pred, "scores")).detach().float().cpu().numpy(),
                       labels=torch.as_tensor(get(pred, "labels")).detach().cpu().numpy())
            if "gt_instances" in ds:
                gt = get(ds, "gt_instances")
                b = torch.as_tensor(get(gt, "bboxes")).detach().float().cpu().clone()
                if meta.get("flip", False):
                    b = flip_boxes(b, meta["img_shape"][1])
                sx, sy = meta.get("scale_factor", (1.0, 1.0))
                rec["gt_bboxes"] = (b / torch.tensor([sx, sy, sx, sy])).numpy()
                rec["gt_labels"] = torch.as_tensor(get(gt, "labels")).cpu().numpy()
            self.results.append(rec)

    def _gt_from_results(self, results, cat_ids):
        images, anns = [], []
        for r in results:
            h, w = r["ori_shape"]
            images.append(dict(id=r["img_id"], height=h, width=w))
            for b, l in zip(r.get("gt_bboxes", []), r.get("gt_labels", [])):
                bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
                anns.append(dict(id=len(anns) + 1, image_id=r["img_id"], category_id=int(cat_ids[int(l)]),
                                 bbox=[float(b[0]), float(b[1]), bw, bh], area=bw * bh, iscrowd=0))
        return dict(images=images, annotations=anns, categories=[dict(id=int(c), name=str(c)) for c in cat_ids])

    def compute_metrics(self, results: list) -> Dict[str, float]:
        from zoo._extras import requires_extra
        with requires_extra("detection", "COCO evaluation"):
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

        meta = self.dataset_meta or {}
        ann_file = self.ann_file or meta.get("ann_file")
        with contextlib.redirect_stdout(io.StringIO()):
            if ann_file:
                gt = COCO(ann_file)
            else:
                num = int(max([int(l) for r in results for l in r["labels"]] +
                              [int(l) for r in results for l in r.get("gt_labels", [])] + [0])) + 1
                cat_ids = meta.get("cat_ids") or list(range(1, num + 1))
                gt = COCO()
                gt.dataset = self._gt_from_results(results, cat_ids)
                gt.createIndex()
        cat_ids = list(meta.get("cat_ids") or sorted(gt.getCatIds()))
        dets = []
        for r in results:
            for b, s, l in zip(r["bboxes"], r["scores"], r["labels"]):
                if int(l) >= len(cat_ids):
                    raise ValueError(f"predicted label {int(l)} has no category (dataset has {len(cat_ids)})")
                dets.append(dict(image_id=r["img_id"], category_id=int(cat_ids[int(l)]),
                                 bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                 score=float(s)))
        img_ids = sorted({r["img_id"] for r in results})
        if not dets:
            print_log("CocoMetric: no predictions at all; every stat is 0", logger="current", level=logging.WARNING)
            return {k: 0.0 for k in self._names()}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = img_ids
        ev.params.maxDets = list(self.max_dets)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        print_log("\n" + buf.getvalue(), logger="current")
        out = {k: float(v) for k, v in zip(self._names(), ev.stats)}
        if self.classwise:
            prec = ev.eval["precision"]  # (T, R, K, A, M)
            for ki, cid in enumerate(ev.params.catIds):
                p = prec[:, :, ki, 0, -1]
                p = p[p > -1]
                name = gt.cats[cid]["name"] if cid in gt.cats else str(cid)
                out[f"bbox_{name}_precision"] = float(p.mean()) if p.size else float("nan")
        return out


# ------------------------------------------------------------------------------------------------
# inference (tools/infer.py): boxes above a score threshold, drawn on the image
# ------------------------------------------------------------------------------------------------
_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190))


def resize_settings(model: torch.nn.Module, info: dict) -> Tuple[int, Optional[int]]:
    """(shorter side, cap on the longer side): the training set's resize if the checkpoint saved it,
    else the model cfg's ``input_size`` (e.g. 800 x 1333 -> short 800, long <= 1333)."""
    ds = info.get("dataset_cfg") or {}
    if ds.get("scales"):
        scales = ds["scales"]
        scales = [scales] if isinstance(scales, int) else list(scales)
        return int(max(scales)), ds.get("max_size")
    size = ((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 800, 1333))[1:]
    return int(min(size)), int(max(size))


def _prepare(path: str, model: torch.nn.Module, short: int, max_size: Optional[int]):
    """Image file -> (original PIL image, normalised (C, h, w) tensor at the inference size)."""
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean = pcfg.get("mean") or (0.485, 0.456, 0.406)
    std = pcfg.get("std") or (0.229, 0.224, 0.225)
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    h, w = target_size(img.height, img.width, short, max_size)
    if (h, w) != (img.height, img.width):
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    in_chans = len(mean)
    if in_chans == 1:
        x = x.mean(0, keepdim=True)
    elif in_chans != 3:
        raise ValueError(f"detection inference supports 1- or 3-channel models, this one has {in_chans}")
    x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return img, x


def draw_detections(img: Image.Image, detections: Sequence[dict], path: str) -> str:
    """Draw each detection's box and ``name score`` label on a copy of ``img`` and save it."""
    canvas = img.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 200))
    for d in detections:
        color = _PALETTE[d["label"] % len(_PALETTE)]
        x0, y0, x1, y1 = d["box"]
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=color, width=width)
        text = f"{d['name']} {d['score']:.2f}"
        tx, ty = x0, max(0, y0 - 11)
        l, t, r, b = draw.textbbox((tx, ty), text)
        draw.rectangle((l, t, r, b), fill=color)
        draw.text((tx, ty), text, fill=(0, 0, 0))
    canvas.save(path)
    return path


def detect(model: torch.nn.Module, info: dict, files: Sequence[str], topk: int = 5, score_thr: float = 0.3,
           out_dir: Optional[str] = "infer_out", size_divisor: int = 32) -> List[dict]:
    """Per image: detections (``label``, ``name``, ``score``, ``box`` xyxy in the input's pixels),
    best first, at most ``topk`` with score >= ``score_thr``; writes ``<out_dir>/<stem>_det.png``."""
    if not hasattr(model, "postprocess"):
        raise TypeError(f"task 'detection' needs a zoo detector with postprocess(); got {type(model).__name__}")
    if not 0.0 <= score_thr <= 1.0:
        raise ValueError(f"score threshold must be in [0, 1], got {score_thr}")
    names = class_names(model, info)
    short, max_size = resize_settings(model, info)
    device = next(model.parameters()).device
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    out = []
    for f in files:
        img, x = _prepare(f, model, short, max_size)
        h, w = x.shape[-2:]
        d = max(1, size_divisor)
        H, W = -(-h // d) * d, -(-w // d) * d
        batch = F.pad(x, (0, W - w, 0, H - h))[None].to(device)
        mask = torch.ones(1, H, W, dtype=torch.bool, device=device)
        mask[:, :h, :w] = False
        with torch.no_grad():
            res = model.postprocess(model(batch, mask), [(h, w)])[0]
        scale = torch.tensor([img.width / w, img.height / h] * 2)
        boxes = res["boxes"].float().cpu() * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img.height)
        scores, labels = res["scores"].float().cpu(), res["labels"].cpu()
        order = scores.argsort(descending=True)
        order = order[scores[order] >= score_thr][:topk]
        dets = [dict(label=int(labels[i]), name=names[int(labels[i])], score=float(scores[i]),
                     box=[round(float(v), 2) for v in boxes[i]]) for i in order]
        r = dict(file=f, width=img.width, height=img.height, detections=dets)
        if out_dir:
            stem = os.path.splitext(os.path.basename(f))[0]
            r["output"] = draw_detections(img, dets, os.path.join(out_dir, f"{stem}_det.png"))
        out.append(r)
    return out


def _print_detections(results: List[dict]) -> None:
    for r in results:
        print(f"{r['file']} ({r['width']}x{r['height']}): {len(r['detections'])} detections")
        for t in r["detections"]:
            x0, y0, x1, y1 = t["box"]
            print(f"  {t['name']} (class {t['label']}): {t['score']:.3f} "
                  f"box=[{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]")
        if r.get("output"):
            print(f"  -> {r['output']}")


register_output_handler("detection", detect, _print_detections)
