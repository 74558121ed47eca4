"""A trained model as timm's Hugging Face Hub folder: ``config.json``, ``model.safetensors``, ``README.md``.

The folder is what ``timm.models.save_for_hf`` writes (architecture, num_classes, label names,
model args, and a ``pretrained_cfg`` with the trained input size, mean/std and crop), plus a model
card in the Hub's format. ``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds
the model, and ``huggingface_hub.upload_folder`` publishes it unchanged (``--push-to-hub``).
Files get the usual modes (0644 under the default umask), and the folder appears atomically: it
is written beside its final place and renamed, so an error leaves no half-written export.
"""
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .compat import load_checkpoint_file

__all__ = ["model_state_dict", "checkpoint_model_cfg", "checkpoint_data_config", "export_model",
           "export_checkpoint", "model_card", "sha256_file", "push_to_hub"]

_PREFIX = "model."


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_state_dict(ckpt: dict, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The timm model's weights: ``state_dict`` without the ``model.`` prefix of the mmengine wrapper."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{source} has no state_dict")
    if not any(k.startswith(_PREFIX) for k in sd):
        raise ValueError(f"{source}: no '{_PREFIX}*' keys; expected a checkpoint of TimmClassifier "
                         f"(first keys: {list(sd)[:3]})")
    # data_preprocessor buffers are not persistent; anything else outside `model.` is not timm's
    return {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX) and torch.is_tensor(v)}


def _saved_config(ckpt: dict):
    text = (ckpt.get("meta") or {}).get("cfg")
    if not isinstance(text, str):
        return None
    from mmengine.config import Config
    try:
        return Config.fromstring(text, ".py")
    except Exception:  # noqa: BLE001 - an unreadable saved config is treated as absent
        return None


def checkpoint_model_cfg(ckpt: dict) -> dict:
    """``model`` dict of the config saved in an mmengine checkpoint's meta (empty if absent)."""
    cfg = _saved_config(ckpt)
    return dict(cfg.get("model") or {}) if cfg is not None else {}


def checkpoint_data_config(ckpt: dict) -> dict:
    """Input size / crop / mean / std the checkpoint was trained and evaluated with (keys as in
    timm's data config; only what the saved config states)."""
    cfg = _saved_config(ckpt)
    if cfg is None:
        return {}
    out: Dict[str, Any] = {}
    for key in ("test_dataloader", "val_dataloader", "train_dataloader"):
        ds = (cfg.get(key) or {}).get("dataset") or {}
        if ds.get("img_size"):
            size = ds["img_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            out["input_size"] = (int(ds.get("in_chans", 3)),) + tuple(int(s) for s in size)
            out["crop_pct"] = float((ds.get("transform_kwargs") or {}).get("crop_pct", 1.0))
            out["dataset"] = ds.get("type")
            break
    pp = (cfg.get("model") or {}).get("data_preprocessor") or {}
    if pp.get("mean") is not None and pp.get("std") is not None:
        scale = 255.0 if max(pp["mean"]) > 1 else 1.0
        out["mean"] = tuple(float(m) / scale for m in pp["mean"])
        out["std"] = tuple(float(s) / scale for s in pp["std"])
    return out


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _yaml_list(key: str, items: Sequence[str]) -> List[str]:
    return [f"{key}:"] + [f"- {json.dumps(str(i))}" for i in items] if items else []


def model_card(*, name: str, architecture: str, pretrained_cfg: Dict[str, Any], num_params_m: float,
               label_names: Optional[Sequence[str]] = None, datasets: Sequence[str] = (),
               task: str = "image-classification", results: Optional[Dict[str, Any]] = None,
               citation: str = "", trained_from: str = "", repo_id: str = "") -> str:
    """A Hub model card (YAML front matter, details, uses and limitations, how to use, results,
    citation) for an exported model; the family cards in model_cards/ follow the same sections."""
    lic = pretrained_cfg.get("license") or "other"
    tags = ["timm", "attention-zoo", task]
    front = ["---", f"license: {lic}", "library_name: timm", *_yaml_list("tags", tags),
             *_yaml_list("datasets", datasets)]
    if task == "image-classification":
        front.append("pipeline_tag: image-classification")
    front.append("---")
    size = pretrained_cfg.get("input_size")
    where = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    lines = front + [
        "", f"# {name}", "",
        f"A `{architecture}` model exported from a training checkpoint of the attention model zoo.", "",
        "## Model details", "",
        f"- **Architecture:** `{architecture}` (registered by `import zoo`)",
        f"- **Parameters:** {num_params_m:.2f} M",
        f"- **Input size:** {tuple(size) if size else 'not fixed'}; mean {pretrained_cfg.get('mean')}, "
        f"std {pretrained_cfg.get('std')}, crop {pretrained_cfg.get('crop_pct')}",
    ]
    if label_names:
        shown = ", ".join(map(str, label_names[:20])) + (", ..." if len(label_names) > 20 else "")
        lines.append(f"- **Classes ({len(label_names)}):** {shown}")
    if pretrained_cfg.get("paper_ids") or pretrained_cfg.get("paper_name"):
        lines.append(f"- **Paper:** {pretrained_cfg.get('paper_name') or ''} {pretrained_cfg.get('paper_ids') or ''}".rstrip())
    if pretrained_cfg.get("origin_url"):
        lines.append(f"- **Reference code:** {pretrained_cfg['origin_url']}")
    if trained_from:
        lines.append(f"- **Exported from:** `{trained_from}`")
    lines += [
        "", "## Intended uses and limitations", "",
        "Inference and fine-tuning on data like the training set named above. The model has only been "
        "evaluated on that data; check it on your own before relying on its predictions, and do not use it "
        "for decisions about people without a dedicated evaluation.", "",
        "## How to use", "", "```python", "import timm, torch, zoo", "",
        f'model = timm.create_model("{where}", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "```", "",
        f"or from the command line: `python tools/infer.py {where.split(':', 1)[1]} image.png`.", "",
        "## Results", "",
    ]
    if results:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in results.items()]
    else:
        lines.append("No evaluation is recorded in this export; `tools/test.py CONFIG CHECKPOINT` measures one.")
    citation = citation or cfg_citation(architecture, pretrained_cfg)
    if citation:
        lines += ["", "## Citation", "", "```bibtex", citation.strip(), "```"]
    return "\n".join(lines) + "\n"


def cfg_citation(architecture: str, pretrained_cfg: Dict[str, Any]) -> str:
    """A BibTeX entry for the paper a cfg names (``paper_name`` + an ``arXiv:`` id in ``paper_ids``);
    "" when the cfg names none. The family cards in model_cards/ carry the full entries."""
    ids = pretrained_cfg.get("paper_ids") or ""
    ids = [ids] if isinstance(ids, str) else list(ids)
    arxiv = next((i.split(":", 1)[1].strip() for i in ids if str(i).lower().startswith("arxiv:")), None)
    title = pretrained_cfg.get("paper_name")
    if not (arxiv and title):
        return ""
    key = re.sub(r"\W+", "_", architecture)
    return "\n".join([f"@misc{{{key},", f"  title         = {{{title}}},", f"  eprint        = {{{arxiv}}},",
                      "  archivePrefix = {arXiv},", f"  url           = {{https://arxiv.org/abs/{arxiv}}}", "}"])


def export_model(model: torch.nn.Module, out_dir: str, *, label_names: Optional[Sequence[str]] = None,
                 data_config: Optional[Dict[str, Any]] = None, model_args: Optional[Dict[str, Any]] = None,
                 card: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> str:
    """Write ``model`` as timm's Hub folder at ``out_dir`` (atomically); returns the folder.

    ``data_config`` (``input_size``, ``mean``, ``std``, ``crop_pct``, ...) replaces the registry's
    preprocessing in the exported ``pretrained_cfg``; ``model_args`` are the keyword arguments that
    rebuild the architecture; ``card`` adds fields to :func:`model_card`.
    """
    from timm.models import save_for_hf

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir) or (os.listdir(out_dir) and not overwrite):
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to "
                                  f"replace a previous export there")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")):
            raise FileExistsError(f"{out_dir} is not a previous export (no config.json); refusing to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.{uuid.uuid4().hex[:8]}.tmp")
    old = None
    model_config = {}
    if label_names:
        model_config["label_names"] = [str(n) for n in label_names]
    try:
        os.mkdir(tmp)
        dcfg = {k: v for k, v in (data_config or {}).items() if k in (
            "input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")}
        save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True,
                    data_config=dcfg or None)
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        src = getattr(model, "pretrained_cfg", None) or {}
        src = {k: dict.get(src, k) for k in src}  # the raw fields (a cfg may guard its image fields)
        if not dcfg and src.get("input_size") is not None and len(src["input_size"]) != 3:
            # not a 2-D image model (e.g. a 3-D segmenter): timm's image data config does not
            # describe its input, so the registry's own input fields are kept as they are
            pc = config["pretrained_cfg"]
            for k in ("input_size", "test_input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation"):
                pc.pop(k, None)
                if src.get(k) is not None:
                    pc[k] = list(src[k]) if isinstance(src[k], tuple) else src[k]
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=4)
        info = dict(card or {})
        text = model_card(
            name=info.pop("name", config["architecture"]), architecture=config["architecture"],
            pretrained_cfg=config.get("pretrained_cfg", {}),
            num_params_m=sum(p.numel() for p in model.parameters()) / 1e6, label_names=label_names, **info)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(text)
        mode = 0o666 & ~_umask()
        for fn in os.listdir(tmp):
            p = os.path.join(tmp, fn)
            os.chmod(p, mode)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(out_dir):
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out_dir):
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def export_checkpoint(ckpt_path: str, out_dir: str, model_name: Optional[str] = None,
                      overwrite: bool = False, card: Optional[Dict[str, Any]] = None) -> Tuple[str, dict]:
    """Export a tools/train.py checkpoint as a Hub folder; returns (path of model.safetensors, info).

    The architecture, its keyword arguments, the class names and the trained input size come from
    the config and dataset metadata saved in the checkpoint.
    """
    import timm

    import zoo  # noqa: F401  (registers the zoo architectures)

    ckpt = load_checkpoint_file(ckpt_path)
    sd = model_state_dict(ckpt, ckpt_path)
    mcfg = checkpoint_model_cfg(ckpt)
    name = model_name or mcfg.get("model_name")
    if not name:
        raise ValueError(f"{ckpt_path}: cannot tell the model name (no config in the checkpoint meta); "
                         "pass --model-name")
    arch = name.split(".")[0]
    kwargs = dict(mcfg.get("model_kwargs") or {})
    kwargs.pop("pretrained_cfg_overlay", None)
    num_classes = mcfg.get("num_classes")
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: the weights do not fit {arch}({kwargs}): missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    classes = list((ckpt.get("meta") or {}).get("dataset_meta", {}).get("classes", ()) or ())
    dcfg = checkpoint_data_config(ckpt)
    info_card = dict(name=_safe_name(arch), trained_from=os.path.basename(ckpt_path),
                     datasets=[dcfg["dataset"]] if dcfg.get("dataset") else [])
    info_card.update(card or {})
    folder = export_model(model, out_dir, label_names=classes or None, data_config=dcfg, card=info_card,
                          overwrite=overwrite)
    path = os.path.join(folder, "model.safetensors")
    info = dict(model_name=arch, folder=folder, file=path, sha256=sha256_file(path), num_classes=num_classes,
                model_kwargs=kwargs, classes=classes, input_size=dcfg.get("input_size"))
    return path, info


def push_to_hub(folder: str, repo_id: str, *, private: bool = False, commit_message: str = "Add model") -> str:
    """Upload an exported folder to the Hugging Face Hub (``huggingface_hub.upload_folder``); the
    token comes from ``huggingface-cli login`` / ``HF_TOKEN``. Returns the commit url."""
    from huggingface_hub import create_repo, upload_folder
    create_repo(repo_id, exist_ok=True, private=private)
    return str(upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message))
