"""Evaluate a checkpoint, or a model's published pretrained weights, on a config's test set.

    python tools/test.py CONFIG CKPT                       # a checkpoint written by tools/train.py
    python tools/test.py CONFIG --pretrained resnet10t.a1_in1k   # timm/zoo weights by name

Prints one ``metrics: {...}`` line and writes it, with the config and the weights evaluated, to
``<work_dir>/metrics.json``. As in mmpretrain, ``--out x.pkl`` writes every sample's prediction
(scores, labels, sample ids) and ``--out x.json --out-item metrics`` the metrics. The weights must
fit the model exactly (keys and shapes), or nothing is evaluated.
"""
import argparse
import json
import os
import os.path as osp


def parse_args(argv=None):
    from zoo._extras import requires_extra
    from zoo.cli._configs import ListConfigsAction, resolve_config

    with requires_extra("train", "zoo-test"):
        from mmengine.config import DictAction

    p = argparse.ArgumentParser(description="Test a zoo/timm model with mmengine")
    p.add_argument("config", help="config file, or the name of a shipped config (e.g. quickstart_digits)")
    p.add_argument("--list-configs", action=ListConfigsAction)
    p.add_argument("checkpoint", nargs="?", help="mmengine checkpoint (.pth) from tools/train.py")
    p.add_argument("--pretrained", metavar="NAME",
                   help="instead of a checkpoint: a timm/zoo model name (with optional .tag) whose "
                        "pretrained weights are evaluated; replaces model.model_name")
    p.add_argument("--work-dir", help="where logs go (default: work_dirs/<config name>)")
    p.add_argument("--out", help="output file: per-sample predictions (.pkl), or the metrics with --out-item "
                                 "metrics (.json/.pkl/.yaml); <work_dir>/metrics.json is written in any case")
    p.add_argument("--out-item", choices=["pred", "metrics"], default="pred",
                   help="what --out holds: 'pred' (default, per-sample predictions) or 'metrics'")
    p.add_argument("--show-dir", help="write each test image with its predictions drawn here (tasks with a 2-D "
                                      "visualisation: detection boxes)")
    p.add_argument("--show-score-thr", type=float, default=0.3, help="with --show-dir: lowest score drawn")
    p.add_argument("--amp", action="store_true", help="run the test loop in fp16 (needs CUDA)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.config = resolve_config(args.config)
    except FileNotFoundError as e:
        p.error(str(e))
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if (args.checkpoint is None) == (args.pretrained is None):
        p.error("give exactly one of CHECKPOINT or --pretrained NAME")
    if args.checkpoint is not None and not osp.exists(args.checkpoint):
        hint = ""
        if "/" not in args.checkpoint and not args.checkpoint.endswith((".pth", ".pt", ".safetensors")):
            hint = f" (to evaluate published weights of a model, use --pretrained {args.checkpoint})"
        p.error(f"checkpoint {args.checkpoint!r} does not exist{hint}")
    if args.out and args.out_item == "pred" and not args.out.endswith((".pkl", ".pickle")):
        p.error(f"--out {args.out}: predictions are written as a pickle (.pkl); for the metrics add --out-item metrics")
    if args.out and args.out_item == "metrics" and not args.out.endswith((".json", ".yaml", ".yml", ".pkl", ".pickle")):
        p.error(f"--out {args.out}: the metrics are written as .json, .yaml or .pkl")
    return args


def build_cfg(args):
    from zoo.engine.compat import guard_dataloaders, init_distributed, load_checkpoint_file
    from zoo.engine.config_check import load_config
    from zoo.engine.hooks import install_reliability_hooks
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
    install_reliability_hooks(cfg, training=False)  # strict: weights that do not fit are an error
    if args.out and args.out_item == "pred":
        evaluators = cfg.get("test_evaluator") or []
        evaluators = list(evaluators) if isinstance(evaluators, (list, tuple)) else [evaluators]
        cfg.test_evaluator = evaluators + [dict(type="zoo.DumpPredictions", out_file=osp.abspath(args.out))]
    if args.show_dir:
        cfg.custom_hooks = list(cfg.get("custom_hooks") or []) + [
            dict(type="zoo.ShowPredictionsHook", out_dir=osp.abspath(args.show_dir), score_thr=args.show_score_thr)]
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
        from mmengine.fileio import dump

        from zoo.engine.checkpoint import atomic_write_text

        record_path = osp.join(cfg.work_dir, "metrics.json")
        os.makedirs(osp.dirname(osp.abspath(record_path)), exist_ok=True)
        record = dict(config=args.config, checkpoint=args.checkpoint, pretrained=args.pretrained,
                      metrics=metrics)
        atomic_write_text(record_path, json.dumps(record, indent=2))
        print("metrics: " + json.dumps(metrics), flush=True)
        print(f"metrics written to {record_path}", flush=True)
        if args.out and args.out_item == "metrics":
            os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
            dump(metrics, args.out)
            print(f"metrics written to {args.out}", flush=True)
        elif args.out:
            print(f"predictions written to {args.out}", flush=True)
        if args.show_dir:
            from zoo.engine.hooks import ShowPredictionsHook
            written = sum(h.written for h in runner.hooks if isinstance(h, ShowPredictionsHook))
            print(f"{written} image(s) with predictions drawn written to {args.show_dir}" if written else
                  "--show-dir: nothing drawn (this task's predictions have no 2-D visualisation)", flush=True)
    return metrics


if __name__ == "__main__":
    main()
