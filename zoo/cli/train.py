"""Train a model from an mmengine config.

    python tools/train.py configs/quickstart_digits.py [--work-dir DIR] [--resume [CKPT]]
    torchrun --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch     # DDP (nccl, or gloo on CPU)
"""
import argparse
import os


def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description="Train a zoo/timm model with mmengine")
    p.add_argument("config", help="config file, e.g. configs/quickstart_digits.py")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT, or from the latest checkpoint in the work dir if no CKPT is given")
    p.add_argument("--load-from", help="initialise weights from a checkpoint (no optimizer/iteration state)")
    p.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper; needs CUDA)")
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale the lr linearly with the total batch size (config's auto_scale_lr)")
    p.add_argument("--no-validate", action="store_true", help="skip validation during training")
    p.add_argument("--cfg-options", nargs="+", action=DictAction,
                   help="override config entries, e.g. train_cfg.max_epochs=2 model.model_name=resnet18")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' under torchrun for distributed training")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def build_cfg(args):
    from zoo.engine.compat import (amp_optim_wrapper, guard_dataloaders, init_distributed, load_checkpoint_file,
                                   sync_buffers_in_ddp)
    from zoo.engine.config_check import load_config

    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        load_checkpoint_file(args.resume)  # clear error for a missing/corrupt file, before training
        cfg.resume, cfg.load_from = True, args.resume
    elif args.load_from:
        load_checkpoint_file(args.load_from)
        cfg.resume, cfg.load_from = False, args.load_from
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


def main(argv=None):
    args = parse_args(argv)
    import zoo.engine  # noqa: F401  (registers models, datasets, metrics, checkpoint allow-list)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    cfg = build_cfg(args)
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    runner.train()


if __name__ == "__main__":
    main()
