"""Early, readable errors for config typos, before the Runner builds anything.

mmengine silently ignores a misspelt top-level key (``trian_cfg``) and reports an unknown ``type``
only deep inside a build. :func:`check_config` catches both and suggests the intended name.
"""
import difflib
from typing import Iterable, List, Optional, Tuple

import mmengine.registry as reg

__all__ = ["check_config", "KNOWN_TOP_LEVEL_KEYS"]

# Keys the Runner (from_cfg, setup_env, wrap_model, ...) and our tools read.
KNOWN_TOP_LEVEL_KEYS = (
    "model", "work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg",
    "val_cfg", "test_cfg", "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator",
    "test_evaluator", "default_hooks", "custom_hooks", "data_preprocessor", "load_from", "resume",
    "launcher", "env_cfg", "log_processor", "log_level", "visualizer", "default_scope",
    "randomness", "experiment_name", "model_wrapper_cfg", "find_unused_parameters", "sync_bn",
    "compile", "custom_imports", "runner_type", "strategy", "cfg", "vis_backends",
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


def check_config(cfg, filename: str = "config") -> None:
    """Raise ValueError for a top-level key that looks like a typo, or a ``type`` no registry knows
    (looked up in the config's ``default_scope``, the zoo's by default)."""
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
