"""Evaluate a checkpoint, or a model's published pretrained weights, on a config's test set.

    python tools/test.py CONFIG CKPT                       # a checkpoint written by tools/train.py
    python tools/test.py CONFIG --pretrained resnet10t.a1_in1k   # timm/zoo weights by name

Prints one ``metrics: {...}`` line and writes the same JSON to ``--out``
(default ``<work_dir>/metrics.json``).
"""
import argparse
import json
import os
import os.path as osp


def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description="Test a zoo/timm model with mmengine")
    p.add_argument("config", help="config file")
    p.add_argument("checkpoint", nargs="?", help="mmengine checkpoint (.pth) from tools/train.py")
    p.add_argument("--pretrained", metavar="NAME",
                   help="instead of a checkpoint: a timm/zoo model name (with optional .tag) whose "
                        "pretrained weights are evaluated; replaces model.model_name")
    p.add_argument("--work-dir", help="where logs go (default: work_dirs/<config name>)")
    p.add_argument("--out", help="metrics JSON file (default: <work_dir>/metrics.json)")
    p.add_argument("--amp", action="store_true", help="run the test loop in fp16 (needs CUDA)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if (args.checkpoint is None) == (args.pretrained is None):
        p.error("give exactly one of CHECKPOINT or --pretrained NAME")
    if args.checkpoint is not None and not osp.exists(args.checkpoint):
        hint = ""
        if "/" not in args.checkpoint and not args.checkpoint.endswith((".pth", ".pt", ".safetensors")):
            hint = f" (to evaluate published weights of a model, use --pretrained {args.checkpoint})"
        p.error(f"checkpoint {args.checkpoint!r} does not exist{hint}")
    return args


def build_cfg(args):
    from zoo.engine.compat import guard_dataloaders, init_distributed, load_checkpoint_file
    from zoo.engine.config_check import load_config
    from zoo.engine.model import check_model_name

    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.pretrained:
        check_model_name(args.pretrained)
        cfg.model.model_name = args.pretrained
        cfg.model.pretrained = True
        cfg.load_from = None
    else:
        load_checkpoint_file(args.checkpoint)  # clear error for a corrupt file before building anything
        cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.amp:
        cfg.test_cfg = dict(cfg.get("test_cfg") or {}, fp16=True)
    # training-only parts are not needed to test
    for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler"):
        cfg.pop(key, None)
    guard_dataloaders(cfg)
    init_distributed(cfg, args.launcher)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    import zoo.engine  # noqa: F401
    from mmengine.dist import is_main_process
    from mmengine.runner import Runner

    cfg = build_cfg(args)
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    metrics = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
               for k, v in (metrics or {}).items()}
    if is_main_process():
        out = args.out or osp.join(cfg.work_dir, "metrics.json")
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        record = dict(config=args.config, checkpoint=args.checkpoint, pretrained=args.pretrained,
                      metrics=metrics)
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
        print("metrics: " + json.dumps(metrics), flush=True)
        print(f"metrics written to {out}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
