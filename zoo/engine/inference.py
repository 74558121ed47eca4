"""Run a trained checkpoint or a named pretrained model on image files (tools/infer.py).

Outputs are formatted per task by handlers in :data:`OUTPUT_HANDLERS`; classification is built in,
detection / segmentation families register theirs with :func:`register_output_handler`.
"""
import inspect
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .compat import load_checkpoint_file
from .export import checkpoint_model_cfg, model_state_dict
from .model import check_model_name

__all__ = ["IMAGE_EXTENSIONS", "find_images", "load_image", "load_model", "class_names", "classify",
           "OUTPUT_HANDLERS", "register_output_handler", "run"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def find_images(inputs: Sequence[str]) -> List[str]:
    """Expand files and folders (recursively) into a sorted list of image files."""
    out = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"folder {item!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is neither an image file nor a folder")
    return out


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """Open an image as ``mode`` ('RGB' or 'L'). 16- and 32-bit greyscale (PNG/TIFF 'I;16', 'I')
    are rescaled to 8 bits over their full range instead of being clipped at 255 by PIL."""
    import numpy as np
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else float(a.max())
                im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
            elif im.mode == "F":
                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
                im = Image.fromarray(np.rint(a * 255.0).astype(np.uint8), "L")
            return im.convert(mode)
    except Exception as e:  # noqa: BLE001 - any decoder failure is "cannot read this image"
        raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None


def _hub_folder(path: str) -> Optional[str]:
    """The timm Hub folder (config.json + weights) that ``path`` is, or holds its weights file."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
            os.path.isfile(os.path.join(folder, f)) for f in ("model.safetensors", "pytorch_model.bin")):
        if os.path.isdir(path) or os.path.basename(path) in ("model.safetensors", "pytorch_model.bin"):
            return folder
    return None


def _dataset_cfg(ckpt: dict) -> dict:
    text = (ckpt.get("meta") or {}).get("cfg")
    if not isinstance(text, str):
        return {}
    from mmengine.config import Config
    try:
        cfg = Config.fromstring(text, ".py")
    except Exception:
        return {}
    for key in ("test_dataloader", "val_dataloader"):
        dl = cfg.get(key)
        if dl and isinstance(dl.get("dataset"), dict):
            return dict(dl["dataset"])
    return {}


def _safetensors_num_classes(path: str, model_name: str) -> int:
    """Class count of an exported file, read from its classifier weight's first dimension."""
    from safetensors import safe_open
    from timm.models import get_pretrained_cfg
    pcfg = get_pretrained_cfg(model_name)
    heads = pcfg.classifier if pcfg is not None else None
    heads = [heads] if isinstance(heads, str) else list(heads or ())
    with safe_open(path, framework="pt") as f:
        for h in heads:
            if f"{h}.weight" in f.keys():
                return int(f.get_slice(f"{h}.weight").get_shape()[0])
    raise ValueError(f"cannot tell the class count of {path!r}; pass --num-classes")


def load_model(model_or_ckpt: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
               device: str = "cpu") -> Tuple[torch.nn.Module, dict]:
    """Build the model; returns (model in eval mode, info with classes, transform settings, task)."""
    import timm

    import zoo  # noqa: F401
    info: dict = dict(classes=None, dataset_cfg={}, source=model_or_ckpt)
    folder = _hub_folder(model_or_ckpt) if os.path.exists(model_or_ckpt) else None
    if model_or_ckpt.startswith(("hf-hub:", "local-dir:")) or folder is not None:
        # an exported / Hub folder: its config.json carries the architecture, trained input size and labels
        name = model_or_ckpt if folder is None else f"local-dir:{folder}"
        if model_name or num_classes is not None:
            raise ValueError(f"{model_or_ckpt} is a model folder whose config.json fixes the architecture and "
                             f"classes; drop --model / --num-classes")
        model = timm.create_model(name, pretrained=True)
        labels = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        info.update(classes=list(labels) if labels else None)
    elif os.path.isdir(model_or_ckpt):
        raise ValueError(f"{model_or_ckpt} is a folder without config.json and model.safetensors; expected a "
                         f"tools/export.py folder, a checkpoint file or a model name")
    elif os.path.isfile(model_or_ckpt) and model_or_ckpt.endswith(".safetensors"):
        if not model_name:
            raise ValueError("a .safetensors file needs --model NAME (the architecture)")
        check_model_name(model_name)
        if num_classes is None:
            num_classes = _safetensors_num_classes(model_or_ckpt, model_name)
        # timm drops the head unless the overlay's num_classes matches the requested one
        overlay = dict(file=model_or_ckpt, num_classes=num_classes)
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes)
    elif os.path.isfile(model_or_ckpt):
        ckpt = load_checkpoint_file(model_or_ckpt)
        mcfg = checkpoint_model_cfg(ckpt)
        name = model_name or mcfg.get("model_name")
        if not name:
            raise ValueError(f"{model_or_ckpt}: no model config in the checkpoint; pass --model NAME")
        check_model_name(name)
        sd = model_state_dict(ckpt, model_or_ckpt)
        ncls = num_classes or mcfg.get("num_classes", 1000)
        model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=ncls,
                                  **(mcfg.get("model_kwargs") or {}))
        model.load_state_dict(sd)
        classes = (ckpt.get("meta") or {}).get("dataset_meta", {}).get("classes")
        info.update(classes=list(classes) if classes else None, dataset_cfg=_dataset_cfg(ckpt))
    else:
        if os.sep in model_or_ckpt or model_or_ckpt.endswith((".pth", ".pt", ".safetensors")):
            raise FileNotFoundError(f"checkpoint {model_or_ckpt!r} does not exist")
        check_model_name(model_or_ckpt)
        kw = {} if num_classes is None else dict(num_classes=num_classes)
        try:
            model = timm.create_model(model_or_ckpt, pretrained=True, **kw)
        except Exception as e:
            raise RuntimeError(f"could not load pretrained weights for {model_or_ckpt!r}: {e} "
                               "(weights download on first use; offline, the cache must already hold them)") from e
    # detectors (a network with postprocess(), see zoo.tasks.detection) default to 'detection'
    default_task = "detection" if hasattr(model, "postprocess") else "classification"
    info["task"] = (getattr(model, "pretrained_cfg", None) or {}).get("task") or default_task
    return model.eval().to(device), info


def class_names(model: torch.nn.Module, info: dict) -> List[str]:
    """Dataset class names if known, ImageNet names for ImageNet-sized heads, else indices."""
    n = model.num_classes
    if info.get("classes") and len(info["classes"]) == n:
        return [str(c) for c in info["classes"]]
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    if pcfg.get("label_names") and len(pcfg["label_names"]) == n:
        return list(pcfg["label_names"])
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    if subset is not None:
        inet = ImageNetInfo(subset)
        return [inet.index_to_description(i) for i in range(n)]
    return [str(i) for i in range(n)]


def _transform(model: torch.nn.Module, info: dict):
    from timm.data import create_transform, resolve_data_config
    dcfg = resolve_data_config({}, model=model)
    ds = info.get("dataset_cfg") or {}
    crop_pct = dcfg.get("crop_pct")
    if ds.get("img_size"):
        size = ds["img_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        dcfg["input_size"] = (dcfg["input_size"][0],) + size
        crop_pct = (ds.get("transform_kwargs") or {}).get("crop_pct", 1.0)
    in_chans = ds.get("in_chans", dcfg["input_size"][0])
    tf = create_transform(input_size=dcfg["input_size"], is_training=False, interpolation=dcfg["interpolation"],
                          mean=dcfg["mean"], std=dcfg["std"], crop_pct=crop_pct)
    mode = "L" if in_chans == 1 or ds.get("type") == "DigitsDataset" else "RGB"

    def apply(path: str) -> torch.Tensor:
        img = load_image(path, mode)
        if mode == "L" and in_chans != 1:
            img = img.convert("RGB")
        return tf(img)
    return apply


def classify(model: torch.nn.Module, info: dict, files: Sequence[str], topk: int = 5,
             batch_size: int = 16) -> List[dict]:
    names = class_names(model, info)
    tf = _transform(model, info)
    device = next(model.parameters()).device
    out: List[dict] = []
    for i in range(0, len(files), batch_size):
        chunk, tensors = [], []
        for f in files[i:i + batch_size]:
            try:
                tensors.append(tf(f))
                chunk.append(f)
            except ValueError as e:  # one unreadable file is reported, the others still run
                out.append(dict(file=f, error=str(e)))
        if not chunk:
            continue
        x = torch.stack(tensors).to(device)
        with torch.no_grad():
            probs = model(x).float().softmax(-1)
        top = probs.topk(min(topk, probs.shape[1]), dim=-1)
        for f, p, idx in zip(chunk, top.values, top.indices):
            out.append(dict(file=f, topk=[dict(index=int(j), name=names[int(j)], score=float(s))
                                         for s, j in zip(p, idx)]))
    order = {f: n for n, f in enumerate(files)}
    return sorted(out, key=lambda r: order[r["file"]])


def _print_classification(results: List[dict]) -> None:
    import sys
    for r in results:
        if "error" in r:
            print(f"{r['file']}\n  error: {r['error']}", file=sys.stderr)
            continue
        print(r["file"])
        for rank, t in enumerate(r["topk"], 1):
            print(f"  {rank}. {t['name']} (class {t['index']}): {t['score'] * 100:.2f}%")


OUTPUT_HANDLERS: Dict[str, Tuple[Callable, Callable]] = {
    "classification": (classify, _print_classification),
}


def register_output_handler(task: str, run_fn: Callable, print_fn: Callable) -> None:
    """Add a task: ``run_fn(model, info, files, topk=..)`` → results; ``print_fn(results)``."""
    OUTPUT_HANDLERS[task] = (run_fn, print_fn)


def run(model_or_ckpt: str, inputs: Sequence[str], topk: int = 5, model_name: Optional[str] = None,
        num_classes: Optional[int] = None, device: str = "cpu", task: Optional[str] = None,
        verbose: bool = True, options: Optional[dict] = None) -> List[dict]:
    """``options``: extra keyword arguments (e.g. ``score_thr``, ``out_dir``) passed on to the task's
    handler where its ``run_fn`` accepts them; the others are ignored."""
    files = find_images(inputs)
    model, info = load_model(model_or_ckpt, model_name, num_classes, device)
    task = task or info["task"]
    if task not in OUTPUT_HANDLERS:
        import zoo.tasks  # noqa: F401  (the task modules register their output handlers)
    if task not in OUTPUT_HANDLERS:
        raise ValueError(f"no inference handler for task {task!r}; known: {', '.join(OUTPUT_HANDLERS)}")
    run_fn, print_fn = OUTPUT_HANDLERS[task]
    accepted = inspect.signature(run_fn).parameters
    extra = {k: v for k, v in (options or {}).items() if k in accepted}
    results = run_fn(model, info, files, topk=topk, **extra)
    if verbose:
        print_fn(results)
    return results
