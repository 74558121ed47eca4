"""Train a model from an mmengine config.

    python tools/train.py configs/quickstart_digits.py [--work-dir DIR] [--resume [CKPT]]
    torchrun --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch     # DDP (nccl, or gloo on CPU)

One training per work dir (a second one is refused, naming the first); checkpoints are written
atomically; ``--resume`` continues from the newest complete checkpoint with the data order and
random state of the interrupted run; ``--load-from`` weights must fit the model unless
``--partial-load`` is given.
"""
import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from zoo._extras import requires_extra
    from zoo.cli._configs import ListConfigsAction

    with requires_extra("train", "zoo-train"):
        from mmengine.config import DictAction

    p = argparse.ArgumentParser(description="Train a zoo/timm model with mmengine")
    p.add_argument("config", help="config file, or the name of a shipped config (e.g. quickstart_digits)")
    p.add_argument("--list-configs", action=ListConfigsAction)
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT, or from the newest complete checkpoint in the work dir if no CKPT "
                        "is given (a work dir without checkpoints starts from scratch)")
    p.add_argument("--load-from", help="initialise weights from a checkpoint (no optimizer/iteration state); "
                                       "its keys and shapes must fit the model")
    p.add_argument("--partial-load", nargs="*", metavar="KEY_PATTERN", default=None,
                   help="with --load-from: allow weights that fit only in part (e.g. a new head), optionally "
                        "only for keys matching the glob patterns (e.g. 'model.head.*'); what is left out is "
                        "logged. Same as `load_partial = True | [patterns]` in the config")
    p.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper; needs CUDA)")
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale the lr linearly with the total batch size (config's auto_scale_lr)")
    p.add_argument("--no-validate", action="store_true", help="skip validation during training")
    p.add_argument("--cfg-options", nargs="+", action=DictAction,
                   help="override config entries, e.g. train_cfg.max_epochs=2 model.model_name=resnet18")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' under torchrun for distributed training")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    from zoo.cli._configs import resolve_config

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.config = resolve_config(args.config)
    except FileNotFoundError as e:
        parser.error(str(e))
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def _resumable(path: str) -> None:
    from zoo.engine.compat import load_checkpoint_file

    ckpt = load_checkpoint_file(path)  # clear error for a missing/corrupt file, before training
    if "meta" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"cannot resume from {path!r}: it is a plain state dict (no 'meta' with the epoch/"
                         "iteration, no optimizer state). Resume needs a checkpoint written by tools/train.py; "
                         "to start a new run from these weights use --load-from.")


def build_cfg(args):
    from zoo.engine.compat import (amp_optim_wrapper, guard_dataloaders, init_distributed, load_checkpoint_file,
                                   sync_buffers_in_ddp)
    from zoo.engine.config_check import load_config
    from zoo.engine.hooks import install_reliability_hooks

    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.partial_load is not None and not args.load_from:
        raise ValueError("--partial-load applies to --load-from weights (a resume always loads everything)")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None  # the checkpoint is chosen under the work-dir lock, in main()
    elif args.resume is not None:
        _resumable(args.resume)
        cfg.resume, cfg.load_from = True, args.resume
    elif args.load_from:
        load_checkpoint_file(args.load_from)
        cfg.resume, cfg.load_from = False, args.load_from
    partial = cfg.pop("load_partial", False)
    if args.partial_load is not None:
        partial = list(args.partial_load) or True
    install_reliability_hooks(cfg, training=True, partial=partial)
    if args.amp:
        amp_optim_wrapper(cfg)
    if args.auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            raise ValueError("--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=N)` in the config")
        cfg.auto_scale_lr.enable = True
    if args.no_validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
        if cfg.get("default_hooks", {}).get("checkpoint", {}).get("save_best"):
            cfg.default_hooks.checkpoint.save_best = None
    guard_dataloaders(cfg)
    init_distributed(cfg, args.launcher)
    if args.launcher != "none":
        sync_buffers_in_ddp(cfg)
    return cfg


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def settle_resume(cfg) -> None:
    """``--resume`` without a file: the newest complete checkpoint of the work dir, or a fresh start
    (with a warning) when it has none. A fresh start over existing checkpoints is reported."""
    import glob
    import os.path as osp

    from zoo.engine.checkpoint import find_resumable_checkpoint

    if cfg.get("resume") and cfg.get("load_from") is None:
        found = find_resumable_checkpoint(cfg.work_dir)
        if found is None:
            _warn(f"--resume: no checkpoint in {osp.abspath(cfg.work_dir)!r}; training starts from scratch")
            cfg.resume = False
        else:
            print(f"resuming from {found}", flush=True)
            cfg.load_from = found
    elif not cfg.get("resume"):
        existing = sorted(glob.glob(osp.join(cfg.work_dir, "epoch_*.pth")) + glob.glob(osp.join(cfg.work_dir, "iter_*.pth")))
        if existing:
            _warn(f"{osp.abspath(cfg.work_dir)!r} holds checkpoints of an earlier run ({', '.join(map(osp.basename, existing))}); "
                  "this new run replaces those it writes again. Use --resume to continue that run instead.")


def main(argv=None):
    args = parse_args(argv)
    import zoo.engine  # noqa: F401  (registers models, datasets, metrics, hooks, checkpoint allow-list)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from zoo.engine.checkpoint import WorkDirLock

    cfg = build_cfg(args)
    lock = WorkDirLock(cfg.work_dir).acquire()
    try:
        if lock.stale_holder:
            _warn(f"took over the lock of {cfg.work_dir!r} left by {WorkDirLock.describe(lock.stale_holder)}, "
                  "which is no longer running")
        settle_resume(cfg)
        runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
        runner.train()
    finally:
        lock.release()


if __name__ == "__main__":
    main()
