"""Hooks that keep a training run's files, resumed state and loaded weights trustworthy.

- :class:`AtomicCheckpointHook` (registered as ``CheckpointHook`` in the zoo scope, so configs with
  ``default_scope='zoo'`` get it for ``type='CheckpointHook'``): every checkpoint and
  ``last_checkpoint`` is written atomically, and a file it replaces (previous best, checkpoints
  beyond ``max_keep_ckpts``) is removed only after its successor exists. On (re)start it removes
  temporary files and checkpoints that an interrupted run had already superseded.
- :class:`ResumeStateHook`: stores the RNG states (python, numpy, torch, CUDA) of every rank in each
  checkpoint and restores them on resume; validation is RNG-neutral, and an epoch whose validation
  was cut short is validated again on resume, so a resumed run reproduces the uninterrupted one.
- :class:`WeightsFitHook`: a checkpoint loaded into the model must fit it (same keys, same shapes),
  unless a partial load was asked for (then the keys left out are logged).
"""
import fnmatch
import os
import os.path as osp
import random
import re
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper

from zoo.registry import HOOKS

from .checkpoint import atomic_write_text, commit_file, remove_stale_temps, temp_path

__all__ = ["AtomicCheckpointHook", "ResumeStateHook", "WeightsFitHook", "check_weights_fit", "install_reliability_hooks", "ShowPredictionsHook"]


@HOOKS.register_module(name=["CheckpointHook", "AtomicCheckpointHook"])
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook with crash-safe writes and removals (same arguments)."""

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._local = isinstance(self.file_backend, LocalBackend)
        if not (self._local and is_main_process()):
            return
        for folder in {osp.abspath(self.out_dir), osp.abspath(runner.work_dir)}:
            for path in remove_stale_temps(folder):
                runner.logger.warning(f"removed {path}, left by an interrupted checkpoint write")
        self._remove_superseded(runner)

    # -- writing ---------------------------------------------------------------------------------
    def _write(self, runner, filename: str, **kwargs) -> None:
        """``runner.save_checkpoint`` into a temporary sibling, then rename it to ``filename``."""
        kwargs.update(self.args)
        if not getattr(self, "_local", False):  # object stores replace objects atomically themselves
            runner.save_checkpoint(self.out_dir, filename, self.file_client_args,
                                   backend_args=self.backend_args, **kwargs)
            return
        final = osp.join(self.out_dir, filename)
        tmp = temp_path(final)
        runner.save_checkpoint(osp.dirname(tmp), osp.basename(tmp), **kwargs)  # rank 0 only
        if is_main_process():
            commit_file(tmp, final)

    def _remove(self, runner, path: str, why: str) -> None:
        if not is_main_process():
            return
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
            runner.logger.info(f"removed {path} ({why})")

    def _save_checkpoint_with_step(self, runner, step, meta):
        superseded = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                superseded = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        self._write(runner, filename, save_optimizer=self.save_optimizer,
                    save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch)
        if not is_main_process():
            return
        atomic_write_text(osp.join(runner.work_dir, "last_checkpoint"), self.last_ckpt)
        if superseded is not None:
            self._remove(runner, self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(superseded)),
                         f"max_keep_ckpts={self.max_keep_ckpts}")

    def _save_best_checkpoint(self, runner, metrics) -> None:
        if not self.save_best:
            return
        step = runner.epoch if self.by_epoch else runner.iter
        unit = "epoch" if self.by_epoch else "iter"
        step_name = self.filename_tmpl.format(step)
        meta = dict(epoch=runner.epoch, iter=runner.iter)
        if "auto" in self.key_indicators:
            self._init_rule(self.rules, [next(iter(metrics))])
        single = len(self.key_indicators) == 1
        hub = runner.message_hub
        updated, replaced = False, []
        for key, rule in zip(self.key_indicators, self.rules):
            score = metrics[key]
            score_key, path_key = ("best_score", "best_ckpt") if single else (f"best_score_{key}", f"best_ckpt_{key}")
            best = hub.get_info(score_key, self.init_value_map[rule])
            if score is None or not self.is_better_than[key](score, best):
                continue
            updated = True
            previous = self.best_ckpt_path if single else self.best_ckpt_path_dict[key]
            name = f"best_{key}_{step_name}".replace("/", "_")
            path = self.file_backend.join_path(self.out_dir, name)
            hub.update_info(score_key, score)
            hub.update_info(path_key, path)
            if single:
                self.best_ckpt_path = path
            else:
                self.best_ckpt_path_dict[key] = path
            self._write(runner, name, save_optimizer=False, save_param_scheduler=False, meta=dict(meta),
                        by_epoch=False)
            runner.logger.info(f"The best checkpoint with {score:0.4f} {key} at {step} {unit} is saved to {name}.")
            if previous and previous != path:
                replaced.append(previous)
        if updated and self.last_ckpt is not None:
            # the resume state must name the new best, so that a resumed run can replace it in turn
            self._save_checkpoint_with_step(runner, step, meta)
        for path in replaced:
            self._remove(runner, path, "superseded by a better checkpoint")

    # -- cleaning up after an interrupted run ------------------------------------------------------
    def _step_of(self, name: str) -> Optional[int]:
        pattern = "^" + re.escape(self.filename_tmpl).replace(re.escape("{}"), r"(\d+)") + "$"
        m = re.match(pattern, name)
        return int(m.group(1)) if m else None

    def _remove_superseded(self, runner) -> None:
        """Files an interrupted run had already replaced but not yet removed: checkpoints older than
        the ones kept, and best checkpoints other than the recorded best. Only files from before
        the resumed step are touched (a resume from an older checkpoint keeps the newer files)."""
        hub = runner.message_hub
        current = runner.epoch if self.by_epoch else runner.iter
        names = os.listdir(self.out_dir) if osp.isdir(self.out_dir) else []
        keep = hub.get_info("keep_ckpt_ids") if self.max_keep_ckpts > 0 else None
        if keep:
            for name in names:
                step = self._step_of(name)
                if step is not None and step < min(keep) and step not in keep:
                    self._remove(runner, osp.join(self.out_dir, name), "superseded before an interruption")
        if not self.save_best:
            return
        single = len(self.key_indicators) == 1
        for key in self.key_indicators:
            recorded = hub.get_info("best_ckpt" if single else f"best_ckpt_{key}")
            if not recorded:
                continue
            prefix = f"best_{key}_".replace("/", "_")
            for name in names:
                if not name.startswith(prefix) or osp.join(self.out_dir, name) == recorded:
                    continue
                step = self._step_of(name[len(prefix):])
                if step is not None and step <= current and osp.basename(recorded) != name:
                    self._remove(runner, osp.join(self.out_dir, name), "a best checkpoint superseded before an "
                                                                       "interruption")


def _capture_rng() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(state: dict) -> dict:
    """RNG states as tensors/ints/strings only, so that ``torch.load(weights_only=True)`` reads them."""
    py = state["python"]
    np_state = state["numpy"]
    out = dict(python=[py[0], torch.tensor(py[1], dtype=torch.int64), -1 if py[2] is None else py[2]],
               numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
               torch=state["torch"])
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _from_plain(plain: dict) -> dict:
    py = plain["python"]
    npv = plain["numpy"]
    out = dict(python=(int(py[0]), tuple(int(v) for v in py[1].tolist()), None if py[2] == -1 else py[2]),
               numpy=(npv[0], npv[1].numpy().astype(np.uint32), int(npv[2]), int(npv[3]), float(npv[4])),
               torch=plain["torch"])
    if "cuda" in plain:
        out["cuda"] = plain["cuda"]
    return out


@HOOKS.register_module()
class ResumeStateHook(Hook):
    """Makes a resumed run continue exactly where the checkpoint left off.

    Saved with each checkpoint (``checkpoint['resume_state']``): the RNG states of all ranks and
    the last validated iteration. Validation saves and restores the RNG states around itself, so
    training draws the same random numbers whether or not (or how often) it validates. A resume
    from a checkpoint written before its epoch's validation finished validates that epoch first,
    so the best checkpoint is chosen as in an uninterrupted run. Runs after the other hooks
    (lowest priority), once the checkpoint hook has settled its files."""

    priority = "LOWEST"
    KEY = "resume_state"

    def __init__(self):
        self._pre_val: Optional[list] = None
        self._epoch_end: Optional[tuple] = None
        self._validated_step = -1
        self._to_restore: Optional[dict] = None
        self._revalidate = False

    def _gather(self) -> list:
        local = _to_plain(_capture_rng())
        return all_gather_object(local) if get_world_size() > 1 else [local]

    def before_val(self, runner) -> None:
        self._pre_val = self._gather()

    def after_val(self, runner) -> None:
        if self._pre_val is not None:
            _restore_rng(_from_plain(self._pre_val[get_rank()]))
        self._pre_val = None

    def before_val_epoch(self, runner) -> None:
        # set before the checkpoint hook's after_val_epoch re-saves: only a checkpoint written after
        # the validation's metrics were computed can carry the current step
        self._validated_step = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        # with several ranks, every rank's state is gathered at the end of each epoch (a collective
        # cannot run inside the rank-0-only save)
        dataloader = getattr(runner.train_loop, "dataloader", None)
        if get_world_size() > 1 and dataloader is not None and batch_idx == len(dataloader) - 1:
            self._epoch_end = (runner.iter + 1, self._gather())

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._pre_val is not None:
            states = self._pre_val
        elif get_world_size() == 1:
            states = [_to_plain(_capture_rng())]
        elif self._epoch_end is not None and self._epoch_end[0] == runner.iter:
            states = self._epoch_end[1]
        else:  # a mid-epoch save under DDP: not restorable exactly
            states = None
        checkpoint[self.KEY] = dict(rng=states, validated_step=self._validated_step)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, "_resume", False):
            return
        state = checkpoint.get(self.KEY)
        rngs = (state or {}).get("rng")
        if not rngs or len(rngs) != get_world_size():
            runner.logger.warning("the checkpoint holds no RNG states for this number of processes: the resumed "
                                  "run draws other random numbers than an uninterrupted one would")
        else:
            self._to_restore = rngs[get_rank()]
        self._validated_step = (state or {}).get("validated_step", -1)
        self._revalidate = state is not None and self._validated_step != checkpoint.get("meta", {}).get("iter")

    def before_train(self, runner) -> None:
        if self._to_restore is not None:
            _restore_rng(_from_plain(self._to_restore))
            self._to_restore = None
        if not self._revalidate:
            return
        self._revalidate = False
        loop = runner.train_loop
        epoch = getattr(loop, "_epoch", 0)
        if getattr(runner, "_val_loop", None) is None or not hasattr(loop, "max_epochs") or epoch == 0:
            return
        if epoch >= loop.val_begin and (epoch % loop.val_interval == 0 or epoch == loop.max_epochs):
            runner.logger.info(f"validating epoch {epoch} again: its checkpoint was written before its "
                               "validation finished")
            runner.val_loop.run()


def _model_of(runner):
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def check_weights_fit(model_state: dict, loaded: dict, source: str,
                      partial: Union[bool, Sequence[str]] = False, logger=None) -> dict:
    """Compare ``loaded`` (a state dict, ``module.`` prefixes stripped) with ``model_state``.

    Without ``partial``: raise RuntimeError listing missing keys, unexpected keys and shape
    mismatches. With ``partial=True`` (or glob patterns of the keys allowed to differ): drop the
    mismatched entries from ``loaded`` (in place), log what was left out, and raise only when
    nothing at all fits or a key outside the patterns differs. Returns the report."""
    keys = {re.sub(r"^module\.", "", k): k for k in loaded}
    missing = sorted(k for k in model_state if k not in keys)
    unexpected = sorted(k for k in keys if k not in model_state)
    shapes = sorted(k for k in keys if k in model_state and hasattr(loaded[keys[k]], "shape")
                    and tuple(loaded[keys[k]].shape) != tuple(model_state[k].shape))
    report = dict(missing=missing, unexpected=unexpected, shape_mismatch=shapes,
                  loaded=len(model_state) - len(missing) - len(shapes))
    if not (missing or unexpected or shapes):
        return report

    def show(names: List[str]) -> str:
        return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    lines = []
    if missing:
        lines.append(f"missing in the checkpoint: {show(missing)}")
    if unexpected:
        lines.append(f"not in the model: {show(unexpected)}")
    if shapes:
        lines.append("shape mismatch: " + show([f"{k} {tuple(loaded[keys[k]].shape)} vs model "
                                                 f"{tuple(model_state[k].shape)}" for k in shapes]))
    detail = "; ".join(lines)
    hint = ""
    if missing and unexpected and all(("model." + k) in model_state for k in unexpected[:5]):
        hint = (" The checkpoint looks like a bare timm state dict: give it as pretrained weights "
                "(model.pretrained=True with model.model_kwargs.pretrained_cfg_overlay.file=PATH).")
    if not partial:
        raise RuntimeError(f"weights in {source} do not fit the model: {detail}.{hint} To fine-tune from "
                           "them anyway (e.g. a new head), ask for a partial load: tools/train.py "
                           "--load-from CKPT --partial-load [KEY_PATTERN ...]")
    patterns = None if partial is True else list(partial)
    if patterns is not None:
        outside = [k for k in missing + unexpected + shapes if not any(fnmatch.fnmatch(k, p) for p in patterns)]
        if outside:
            raise RuntimeError(f"weights in {source} do not fit the model outside the allowed patterns {patterns}: "
                               f"{show(outside)} ({detail})")
    if report["loaded"] == 0:
        raise RuntimeError(f"no tensor of {source} fits the model ({detail}).{hint}")
    for k in shapes:
        del loaded[keys[k]]
    if logger is not None:
        logger.warning(f"partial load from {source}: {report['loaded']} of {len(model_state)} tensors loaded; "
                       f"left at their initial values: {missing + shapes}; ignored from the checkpoint: "
                       f"{unexpected + shapes}")
    return report


@HOOKS.register_module()
class WeightsFitHook(Hook):
    """Refuse a checkpoint whose weights do not fit the model (``load_from``, resume, testing).

    Args:
        partial: allow a partial ``load_from`` (never for a resume): ``True`` for any mismatch, or
            glob patterns of the keys allowed to be missing / unexpected / of another shape
            (e.g. ``['model.head.*']``). What is left out is logged.
    """

    priority = "VERY_HIGH"

    def __init__(self, partial: Union[bool, Sequence[str]] = False):
        if not isinstance(partial, bool) and not (isinstance(partial, (list, tuple))
                                                  and all(isinstance(p, str) for p in partial)):
            raise TypeError(f"partial must be a bool or a list of key patterns, got {partial!r}")
        self.partial = partial if isinstance(partial, bool) else list(partial)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        source = repr(getattr(runner, "_load_from", None) or "the checkpoint")
        resuming = bool(getattr(runner, "_resume", False))
        if resuming and "meta" not in checkpoint:
            raise ValueError(f"cannot resume from {source}: it is a plain state dict (no 'meta' with the epoch/"
                             "iteration, no optimizer state). Resume needs a checkpoint written by "
                             "tools/train.py; to start a new run from these weights use --load-from.")
        state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
        check_weights_fit(_model_of(runner).state_dict(), state, source,
                          partial=False if resuming else self.partial, logger=runner.logger)


def install_reliability_hooks(cfg, training: bool, partial: Union[bool, Sequence[str]] = False) -> None:
    """Add the zoo's reliability hooks to ``cfg`` (tools/train.py and tools/test.py call this).

    The checkpoint hook is pinned to the zoo's atomic one whatever the config's default scope; a
    ``WeightsFitHook`` checks every loaded checkpoint (strict at test time, ``partial`` when
    training); training also gets a ``ResumeStateHook``."""
    ckpt = (cfg.get("default_hooks") or {}).get("checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("type") in ("CheckpointHook", "AtomicCheckpointHook"):
        ckpt["type"] = "zoo.AtomicCheckpointHook"
    hooks = [h for h in (cfg.get("custom_hooks") or [])
             if not (isinstance(h, dict) and str(h.get("type", "")).split(".")[-1] in ("WeightsFitHook",
                                                                                        "ResumeStateHook"))]
    hooks.append(dict(type="zoo.WeightsFitHook", partial=partial if training else False))
    if training:
        hooks.append(dict(type="zoo.ResumeStateHook"))
    cfg.custom_hooks = hooks


@HOOKS.register_module()
class ShowPredictionsHook(Hook):
    """``tools/test.py --show-dir``: writes each test image with its predicted boxes drawn
    (``pred_instances`` with ``bboxes``/``scores``/``labels``, as detection models return them) to
    ``out_dir/<sample id>.png``. Samples without a drawable prediction (classification, 3-D
    volumes) are skipped; ``written`` counts the images."""

    priority = "NORMAL"

    def __init__(self, out_dir: str, score_thr: float = 0.3):
        if not 0.0 <= score_thr <= 1.0:
            raise ValueError(f"score_thr must be in [0, 1], got {score_thr}")
        self.out_dir, self.score_thr, self.written = out_dir, float(score_thr), 0

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        from PIL import Image
        from torchvision.utils import draw_bounding_boxes

        images = (data_batch or {}).get("inputs")
        if images is None or not outputs:
            return
        for i, (img, sample) in enumerate(zip(images, outputs)):
            pred = sample.get("pred_instances") if hasattr(sample, "get") else None
            if pred is None or "bboxes" not in pred or img.ndim != 3 or img.dtype != torch.uint8:
                continue
            keep = pred.scores >= self.score_thr
            boxes = pred.bboxes[keep].detach().float().cpu()
            sx, sy = sample.metainfo.get("scale_factor", (1.0, 1.0))  # boxes are in file pixels
            boxes = boxes * torch.tensor([sx, sy, sx, sy])
            names = runner.test_dataloader.dataset.metainfo.get("classes") if hasattr(
                runner.test_dataloader.dataset, "metainfo") else None
            labels = [f"{names[int(l)] if names else int(l)} {float(s):.2f}"
                      for l, s in zip(pred.labels[keep], pred.scores[keep])]
            rgb = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
            drawn = draw_bounding_boxes(rgb.cpu(), boxes, labels=labels, colors="red", width=2)
            key = sample.metainfo.get("img_id", sample.metainfo.get("sample_idx", f"{batch_idx}_{i}"))
            os.makedirs(self.out_dir, exist_ok=True)
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(osp.join(self.out_dir, f"{key}.png"))
            self.written += 1
