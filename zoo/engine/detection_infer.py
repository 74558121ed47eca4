"""Detection output for tools/infer.py: run a zoo detector (``forward(images, masks)`` +
``postprocess``) on image files, keep the boxes above a score threshold and draw them.

Registered as the ``'detection'`` handler of :mod:`zoo.engine.inference`; models whose network has
``postprocess`` default to it.
"""
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .detection import _target_size
from .inference import class_names, register_output_handler

__all__ = ["detect", "draw_detections", "resize_settings"]

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
    h, w = _target_size(img.height, img.width, short, max_size)
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
