"""Classify (or detect in) image files or folders with a checkpoint or a pretrained model; prints the results.

    python tools/infer.py work_dirs/quickstart_digits/best_accuracy_top1_epoch_8.pth my_digits/
    python tools/infer.py resnet10t.a1_in1k cat.jpg --topk 3        # ImageNet class names
    python tools/infer.py exported/digits_ptnt my_digits/          # a tools/export.py folder: its input size, labels
    python tools/infer.py hf-hub:my-org/digits-ptnt x.png            # the same folder on the Hugging Face Hub
    python tools/infer.py weights.safetensors x.png --model resnet10t --num-classes 10
    python tools/infer.py work_dirs/agunet/best.pth case.nii.gz --out-dir masks/   # NIfTI mask + PNG overlay
    python tools/infer.py work_dirs/focus_detr/best.pth street.jpg --score-thr 0.5  # boxes -> infer_out/street_det.png
"""
import argparse
import json
import os.path as osp
import sys


def _is_nifti(path):
    if osp.isdir(path):
        import glob
        return bool(glob.glob(osp.join(path, "*.nii")) + glob.glob(osp.join(path, "*.nii.gz")))
    return path.endswith((".nii", ".nii.gz"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_OR_CKPT",
                   help="tools/train.py checkpoint (.pth), tools/export.py folder, hf-hub:REPO, a bare "
                        ".safetensors (with --model), or a timm/zoo model name")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--model-name", "--model", dest="model_name",
                   help="architecture for a .safetensors file (or to override a checkpoint's)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--task", help="output handler (default: from the model's cfg, else classification)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.add_argument("--out-dir", default="infer_out",
                   help="where 3-D segmentation masks / overlays and detection drawings (<image>_det.png) go")
    p.add_argument("--score-thr", type=float, default=0.3,
                   help="detection: keep boxes scoring at least this (0..1); at most --topk per image")
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error(f"--topk must be >= 1, got {args.topk}")
    if not 0.0 <= args.score_thr <= 1.0:
        p.error(f"--score-thr must be in [0, 1], got {args.score_thr}")

    if args.task == "seg3d" or any(_is_nifti(i) for i in args.inputs):
        from zoo.tasks.seg3d import infer_nifti
        return infer_nifti(args.model, args.inputs, args.out_dir, model_name=args.model_name, device=args.device)

    from zoo.engine.inference import run

    results = run(args.model, args.inputs, topk=args.topk, model_name=args.model_name,
                  num_classes=args.num_classes, device=args.device, task=args.task,
                  options=dict(score_thr=args.score_thr, out_dir=args.out_dir))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    failed = [r["file"] for r in results if isinstance(r, dict) and "error" in r]
    if failed:
        # the other files' results are printed (and in --json) above
        sys.exit(f"error: {len(failed)} of {len(results)} input files could not be processed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
