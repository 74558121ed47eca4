"""Narrow fixes that make mmengine 0.10.7 work on current torch (2.6+, tested on 2.14).

1. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, and mmengine's checkpoint
   loader does not pass the flag, so ``load_from``/``resume`` fail on mmengine's own checkpoints
   (open-mmlab/mmengine#1655). We allow-list exactly what those checkpoints pickle: the
   ``HistoryBuffer`` of the message hub, numpy arrays/scalars/dtypes, and a ``getattr`` restricted
   to HistoryBuffer's statistics methods. ``weights_only`` stays on for everything else.
2. CPU DDP: mmengine calls ``torch.cuda.set_device`` in its pytorch launcher and passes
   ``device_ids`` to DDP, both of which fail without CUDA. :func:`init_distributed` starts gloo
   itself before the Runner exists (so mmengine skips its own init), and
   :class:`ZooDistributedDataParallel` drops ``device_ids`` for CPU modules.
3. Pretrained weights surviving ``Runner.train()``'s ``init_weights`` is handled in
   :class:`zoo.engine.model.TimmClassifier` (``self.model.is_init = True``).
"""
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import MMDistributedDataParallel

from zoo.registry import MODEL_WRAPPERS

__all__ = ["allow_mmengine_checkpoints", "ZooDistributedDataParallel", "init_distributed",
           "guard_dataloaders", "load_checkpoint_file", "sync_buffers_in_ddp", "amp_optim_wrapper"]

_HISTORY_BUFFER_METHODS = frozenset({"min", "max", "mean", "current"})


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr`` while unpickling: only HistoryBuffer's statistics."""
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise torch.serialization.pickle.UnpicklingError(
        f"refusing getattr({obj!r}, {name!r}) while loading a checkpoint: only HistoryBuffer "
        f"statistics methods {sorted(_HISTORY_BUFFER_METHODS)} are allowed")


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    out = [np.ndarray, np.dtype, (core.multiarray.scalar, f"{core.__name__}.multiarray.scalar"),
           (core.multiarray._reconstruct, f"{core.__name__}.multiarray._reconstruct")]
    if core.__name__ == "numpy._core":  # numpy 2 loading a numpy-1 file pickles numpy.core.*
        out += [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes as numpy.dtypes.XDType
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


_ALLOWED = False


def allow_mmengine_checkpoints() -> None:
    """Allow-list mmengine's checkpoint contents for ``torch.load(weights_only=True)``. Idempotent."""
    global _ALLOWED
    if _ALLOWED or not hasattr(torch.serialization, "add_safe_globals"):
        return
    torch.serialization.add_safe_globals(
        [HistoryBuffer, (_history_buffer_getattr, "builtins.getattr")] + _numpy_globals())
    _ALLOWED = True


def load_checkpoint_file(path: str, map_location: str = "cpu") -> dict:
    """Load an mmengine/torch checkpoint with ``weights_only=True`` and clear errors."""
    allow_mmengine_checkpoints()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, foreign pickled classes ...
        raise RuntimeError(
            f"cannot read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Expected a .pth written by tools/train.py (mmengine) or a plain torch state dict; "
            "the file may be truncated or corrupted.") from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict "
                           "(an mmengine checkpoint or a state dict)")
    return ckpt


@MODEL_WRAPPERS.register_module()
class ZooDistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel that also runs on CPU (gloo): ``device_ids`` only for CUDA modules."""

    def __init__(self, module, detect_anomalous_params: bool = False, **kwargs):
        param = next(module.parameters(), None)
        if param is None or param.device.type == "cpu":
            kwargs.pop("device_ids", None)
            kwargs.pop("output_device", None)
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params, **kwargs)


def init_distributed(cfg, launcher: str) -> None:
    """Prepare ``cfg`` for ``launcher``; start gloo ourselves when CUDA is unavailable.

    With CUDA, mmengine's own launcher (nccl, one device per local rank) is used unchanged.
    """
    if launcher == "none":
        return
    if launcher != "pytorch":
        raise ValueError(f"launcher must be 'none' or 'pytorch', got {launcher!r}")
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--launcher pytorch needs torchrun's environment variables (missing: "
                           f"{', '.join(missing)}); start with `torchrun --nproc_per_node N tools/train.py ...`")
    if cfg.get("model_wrapper_cfg") is None:
        cfg.model_wrapper_cfg = dict(type="ZooDistributedDataParallel", broadcast_buffers=False,
                                     find_unused_parameters=cfg.get("find_unused_parameters", False))
    wrapper_type = cfg.model_wrapper_cfg.get("type")
    if isinstance(wrapper_type, str) and "." not in wrapper_type and wrapper_type in MODEL_WRAPPERS.module_dict:
        # mmengine's Runner looks the wrapper up with MODEL_WRAPPERS.get(), which ignores the
        # default scope: name the zoo's own wrapper with its scope.
        cfg.model_wrapper_cfg["type"] = f"zoo.{wrapper_type}"
    if torch.cuda.is_available():
        return
    env_cfg = cfg.get("env_cfg") or {}
    env_cfg.setdefault("dist_cfg", {})
    env_cfg["dist_cfg"]["backend"] = "gloo"
    cfg.env_cfg = env_cfg
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def sync_buffers_in_ddp(cfg) -> None:
    """mmengine's DDP runs with ``broadcast_buffers=False``: BatchNorm statistics drift apart per
    rank. Add mmengine's SyncBuffersHook (mean over ranks after each epoch) unless present."""
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(isinstance(h, dict) and h.get("type") == "SyncBuffersHook" for h in hooks):
        hooks.append(dict(type="SyncBuffersHook"))
    cfg.custom_hooks = hooks


def guard_dataloaders(cfg) -> None:
    """``persistent_workers=True`` with ``num_workers=0`` is a ValueError in torch: switch it off."""
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg.get(key)
        if dl and dl.get("num_workers", 0) == 0 and dl.get("persistent_workers", False):
            dl["persistent_workers"] = False


def amp_optim_wrapper(cfg) -> None:
    """``--amp``: mmengine's AmpOptimWrapper (dynamic loss scale) needs an accelerator."""
    if not torch.cuda.is_available():
        raise RuntimeError("--amp needs a CUDA device (mmengine's AmpOptimWrapper does not run on CPU)")
    ow = cfg.optim_wrapper
    if ow.get("type", "OptimWrapper") == "AmpOptimWrapper":
        return
    if ow.get("type", "OptimWrapper") != "OptimWrapper":
        raise ValueError(f"--amp replaces an OptimWrapper, but the config uses {ow.get('type')!r}")
    ow["type"] = "AmpOptimWrapper"
    ow.setdefault("loss_scale", "dynamic")


allow_mmengine_checkpoints()
