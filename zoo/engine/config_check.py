"""Early, readable errors for config typos, before the Runner builds anything.

mmengine silently ignores a misspelt top-level key (``trian_cfg``) and reports an unknown ``type``
only deep inside a build. :func:`check_config` catches both and suggests the intended name.
"""
import difflib
import inspect
from typing import Iterable, List, Optional, Sequence, Tuple

import mmengine.registry as reg

__all__ = ["check_config", "KNOWN_TOP_LEVEL_KEYS"]

# Keys the Runner (from_cfg, setup_env, wrap_model, ...) and our tools read.
KNOWN_TOP_LEVEL_KEYS = (
    "model", "work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg",
    "val_cfg", "test_cfg", "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator",
    "test_evaluator", "default_hooks", "custom_hooks", "data_preprocessor", "load_from", "resume",
    "launcher", "env_cfg", "log_processor", "log_level", "visualizer", "default_scope",
    "randomness", "experiment_name", "model_wrapper_cfg", "find_unused_parameters", "sync_bn",
    "compile", "custom_imports", "runner_type", "strategy", "cfg", "vis_backends", "load_partial",
)

_ALL_REGISTRIES = (
    reg.MODELS, reg.DATASETS, reg.DATA_SAMPLERS, reg.TRANSFORMS, reg.METRICS, reg.EVALUATOR,
    reg.OPTIMIZERS, reg.OPTIM_WRAPPERS, reg.OPTIM_WRAPPER_CONSTRUCTORS, reg.PARAM_SCHEDULERS,
    reg.HOOKS, reg.LOOPS, reg.MODEL_WRAPPERS, reg.FUNCTIONS, reg.VISUALIZERS, reg.VISBACKENDS,
    reg.LOG_PROCESSORS, reg.RUNNERS, reg.WEIGHT_INITIALIZERS, reg.STRATEGIES,
)

# Where the Runner builds objects from ``type=`` dicts (and which registries it looks in).
_BUILD_SITES = (
    ("model", (reg.MODELS,)),
    ("model.data_preprocessor", (reg.MODELS,)),
    ("data_preprocessor", (reg.MODELS,)),
    ("optim_wrapper", (reg.OPTIM_WRAPPERS,)),
    ("optim_wrapper.optimizer", (reg.OPTIMIZERS,)),
    ("optim_wrapper.constructor", (reg.OPTIM_WRAPPER_CONSTRUCTORS,)),
    ("param_scheduler", (reg.PARAM_SCHEDULERS,)),
    ("val_evaluator", (reg.METRICS, reg.EVALUATOR)),
    ("test_evaluator", (reg.METRICS, reg.EVALUATOR)),
    ("custom_hooks", (reg.HOOKS,)),
    ("model_wrapper_cfg", (reg.MODEL_WRAPPERS,)),
    ("train_cfg", (reg.LOOPS,)),
    ("val_cfg", (reg.LOOPS,)),
    ("test_cfg", (reg.LOOPS,)),
    ("visualizer", (reg.VISUALIZERS,)),
    ("visualizer.vis_backends", (reg.VISBACKENDS,)),
    ("log_processor", (reg.LOG_PROCESSORS,)),
) + tuple(
    (f"{dl}.{part}", regs)
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader")
    for part, regs in (("dataset", (reg.DATASETS,)), ("sampler", (reg.DATA_SAMPLERS,)),
                       ("batch_sampler", (reg.DATA_SAMPLERS,)), ("collate_fn", (reg.FUNCTIONS,)))
)


def _lookup(cfg, dotted: str) -> list:
    node = cfg if isinstance(cfg, dict) else {k: cfg.get(k) for k in cfg.keys()}  # Config is no dict
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return []
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else [node]


def _scoped(registry, scope: Optional[str]):
    """The registry a Runner with ``default_scope=scope`` builds from (the zoo's child for 'zoo')."""
    if scope:
        with registry.switch_scope_and_registry(scope) as scoped:
            return scoped
    return registry


def _names(registries: Iterable) -> List[str]:
    out = set()
    for r in registries:
        r.import_from_location()
        node = r
        while node is not None:  # children and their parents
            out.update(node.module_dict)
            node = node.parent
    return sorted(out)


def _type_known(name: str, registries: Tuple) -> bool:
    for r in registries:
        r.import_from_location()
        if r.get(name) is not None:
            return True
    return False


def _get_type(name: str, registries: Tuple):
    for r in registries:
        r.import_from_location()
        obj = r.get(name)
        if obj is not None:
            return obj
    return None


def _accepted(obj) -> Tuple[Optional[dict], bool]:
    """The keyword arguments ``obj`` (a class or a function) accepts, and whether it takes ``**kwargs``."""
    from mmengine.hooks import CheckpointHook

    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None, True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if var_kw and isinstance(obj, type) and issubclass(obj, CheckpointHook):
        # its **kwargs go to Runner.save_checkpoint, whose every argument the hook already passes
        params, var_kw = inspect.signature(CheckpointHook.__init__).parameters, False
    named = {n: p for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, var_kw


def _check_arguments(obj, item: dict, where: str, filename: str, skip: Sequence[str] = ()) -> None:
    """Unknown keyword arguments, and strings given where the argument is a number, fail here
    rather than deep inside the Runner (after the environment dump, or after an epoch)."""
    named, var_kw = _accepted(obj)
    if named is None:
        return
    name = getattr(obj, "__name__", str(obj))
    for key, value in item.items():
        if key == "type" or key in skip or key.startswith("_"):
            continue
        param = named.get(key)
        if param is None:
            if var_kw:
                continue
            close = difflib.get_close_matches(key, list(named), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{filename}: {where}.{key} is not an argument of {name}{hint} "
                             f"(accepted: {', '.join(sorted(named))})")
        default = param.default
        annotation = str(param.annotation)
        numeric_default = (isinstance(default, (int, float)) and default is not param.empty
                           and "str" not in annotation and "Any" not in annotation)
        if isinstance(value, str) and (numeric_default or param.annotation in (int, float, bool)):
            kind = "true/false" if isinstance(default, bool) or param.annotation is bool else "a number"
            was = f" (default {default!r})" if default is not param.empty else ""
            raise ValueError(f"{filename}: {where}.{key}={value!r} is a string, but {name} expects {kind}"
                             f"{was}; write it without quotes")


_DATALOADER_BUILDER_KEYS = ("dataset", "sampler", "batch_sampler", "collate_fn", "worker_init_fn",
                            "num_batch_per_epoch")


def _check_site_arguments(cfg, filename: str, scope: Optional[str]) -> None:
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, TestLoop, ValLoop
    from mmengine.optim import OptimWrapper
    from torch.utils.data import DataLoader

    for site, registries in _BUILD_SITES:
        registries = tuple(_scoped(r, scope) for r in registries)
        items = _lookup(cfg, site)
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            where = site if len(items) == 1 else f"{site}[{i}]"
            obj, skip = None, ()
            if isinstance(item.get("type"), str) and "." not in item["type"]:
                obj = _get_type(item["type"], registries)
            elif isinstance(item.get("type"), type):
                obj = item["type"]
            elif "type" not in item:
                obj = {"val_cfg": ValLoop, "test_cfg": TestLoop, "optim_wrapper": OptimWrapper}.get(site)
                if site == "train_cfg" and "by_epoch" in item:
                    obj, skip = (EpochBasedTrainLoop if item["by_epoch"] else IterBasedTrainLoop), ("by_epoch",)
            if site == "optim_wrapper":
                skip = ("optimizer", "constructor", "paramwise_cfg")
            if obj is not None:
                _check_arguments(obj, item, where, filename, skip)
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader"):
        item = cfg.get(dl)
        if isinstance(item, dict):
            _check_arguments(DataLoader, item, dl, filename, _DATALOADER_BUILDER_KEYS)
    hooks_reg = (_scoped(reg.HOOKS, scope),)
    for name, item in (cfg.get("default_hooks") or {}).items():
        if isinstance(item, dict) and isinstance(item.get("type"), str):
            obj = _get_type(item["type"], hooks_reg) if "." not in item["type"] else None
            if obj is None and "." not in item["type"]:
                close = difflib.get_close_matches(item["type"], _names(hooks_reg), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"{filename}: default_hooks.{name}.type={item['type']!r} is not a registered hook{hint}")
            if obj is not None:
                _check_arguments(obj, item, f"default_hooks.{name}", filename)


def check_config(cfg, filename: str = "config") -> None:
    """Raise ValueError for a top-level key that looks like a typo, a ``type`` no registry knows
    (looked up in the config's ``default_scope``, the zoo's by default), an argument the built
    class does not take (``max_epoch``, ``img_sise``, ``default_hooks.checkpoint.intervl``), or a
    quoted number (``lr='1e-3'``)."""
    known = set(KNOWN_TOP_LEVEL_KEYS)
    for key in cfg.keys():
        if key in known or key.startswith("_"):
            continue
        close = difflib.get_close_matches(key, KNOWN_TOP_LEVEL_KEYS, n=1, cutoff=0.8)
        if close:  # other unknown keys are allowed: configs keep helper variables (img_size = ...)
            raise ValueError(f"{filename}: unknown top-level key {key!r}; did you mean {close[0]!r}?")
    scope = cfg.get("default_scope") or "zoo"
    for site, registries in _BUILD_SITES:
        registries = tuple(_scoped(r, scope) for r in registries)
        for i, item in enumerate(_lookup(cfg, site)):
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                continue
            name = item["type"]
            if "." in name or _type_known(name, registries):  # scoped / import-path names: Runner checks
                continue
            close = difflib.get_close_matches(name, _names(registries), n=3, cutoff=0.6)
            where = site if len(_lookup(cfg, site)) == 1 else f"{site}[{i}]"
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"{filename}: {where}.type={name!r} is not registered in "
                             f"{'/'.join(r.name for r in registries)}{hint} (is `custom_imports` "
                             "importing the module that registers it, e.g. zoo.tasks.detection?)")
    _check_site_arguments(cfg, filename, scope)


def load_config(path: str, cfg_options=None, launcher: str = "none", work_dir=None):
    """What tools/train.py and tools/test.py both do first: read the config, apply --cfg-options,
    check it for typos, and settle the launcher and the work dir (default ``work_dirs/<name>``)."""
    import os.path as osp

    from mmengine.config import Config

    if not osp.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get("default_scope") is None:  # as OpenMMLab tools do: their own scope unless the config names one
        cfg.default_scope = "zoo"
    check_config(cfg, path)
    cfg.launcher = launcher
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(path))[0])
    return cfg
