"""Export a training checkpoint as timm-loadable safetensors, named by the sha256 of its bytes.

    python tools/export.py work_dirs/quickstart_digits/epoch_8.pth exported/
    # -> exported/resnet10t-1a2b3c4d.safetensors, then in Python:
    timm.create_model('resnet10t', pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file='exported/resnet10t-1a2b3c4d.safetensors', num_classes=10))
"""
import argparse
import json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="mmengine checkpoint (.pth) written by tools/train.py")
    p.add_argument("out_dir", help="output folder (created if needed)")
    p.add_argument("--model-name", help="model name if the checkpoint meta has no config")
    args = p.parse_args(argv)

    from zoo.engine.export import export_checkpoint

    path, info = export_checkpoint(args.checkpoint, args.out_dir, args.model_name)
    kw = dict(info["model_kwargs"])
    overlay = f"file={path!r}"
    if info["num_classes"] is not None:
        # timm drops the classifier when num_classes differs from the pretrained cfg's, so the
        # overlay states the file's class count as well
        kw["num_classes"] = info["num_classes"]
        overlay += f", num_classes={info['num_classes']}"
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    print(json.dumps(info, indent=2))
    print(f"load with: timm.create_model({info['model_name']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict({overlay}){extra})")
    return path


if __name__ == "__main__":
    main()
