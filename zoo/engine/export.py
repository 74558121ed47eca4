"""Training checkpoint → timm-loadable safetensors, named ``<model>-<sha256[:8]>.safetensors``.

The hash is of the file's bytes (unlike mmengine's ``published_keys``, which hashes the pickle),
so ``zoo.hub`` / ``torch.hub.check_hash`` style verification works on the published file.
"""
import hashlib
import os
import re
import tempfile
from typing import Dict, Optional, Tuple

import torch

from .compat import load_checkpoint_file

__all__ = ["model_state_dict", "export_checkpoint", "sha256_file", "checkpoint_model_cfg"]

_PREFIX = "model."


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_state_dict(ckpt: dict, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The timm model's weights: ``state_dict`` (or ``ema_state_dict``) without the ``model.`` prefix."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{source} has no state_dict")
    if not any(k.startswith(_PREFIX) for k in sd):
        raise ValueError(f"{source}: no '{_PREFIX}*' keys; expected a checkpoint of TimmClassifier "
                         f"(first keys: {list(sd)[:3]})")
    # data_preprocessor buffers are not persistent; anything else outside `model.` is not timm's
    return {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX) and torch.is_tensor(v)}


def checkpoint_model_cfg(ckpt: dict) -> dict:
    """``model`` dict of the config saved in an mmengine checkpoint's meta (empty if absent)."""
    text = (ckpt.get("meta") or {}).get("cfg")
    if not isinstance(text, str):
        return {}
    from mmengine.config import Config
    try:
        return dict(Config.fromstring(text, ".py").get("model") or {})
    except Exception:
        return {}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def export_checkpoint(ckpt_path: str, out_dir: str, model_name: Optional[str] = None) -> Tuple[str, dict]:
    """Write the weights of ``ckpt_path`` to ``out_dir``; returns (path, info)."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint_file(ckpt_path)
    sd = model_state_dict(ckpt, ckpt_path)
    mcfg = checkpoint_model_cfg(ckpt)
    name = model_name or mcfg.get("model_name")
    if not name:
        raise ValueError(f"{ckpt_path}: cannot tell the model name (no config in the checkpoint meta); "
                         "pass --model-name")
    arch = name.split(".")[0]
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    # safetensors refuses shared storage; clone aliases (e.g. tied weights)
    seen = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            tensors[k] = v.clone()
        seen[key] = k
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_safe_name(arch)}-", suffix=".safetensors.tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "model_name": arch})
        digest = sha256_file(tmp)
        final = os.path.join(out_dir, f"{_safe_name(arch)}-{digest[:8]}.safetensors")
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    num_classes = mcfg.get("num_classes")
    info = dict(model_name=arch, file=final, sha256=digest, num_tensors=len(tensors),
                num_classes=num_classes, model_kwargs=mcfg.get("model_kwargs") or {},
                classes=list((ckpt.get("meta") or {}).get("dataset_meta", {}).get("classes", ()) or ()))
    return final, info
