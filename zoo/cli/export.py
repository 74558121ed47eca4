"""Export a training checkpoint as timm's Hugging Face Hub folder (config.json, model.safetensors, README.md).

    python tools/export.py work_dirs/quickstart_digits/epoch_8.pth exported/digits_ptnt
    # then, in Python (after `import zoo`):
    timm.create_model('local-dir:exported/digits_ptnt', pretrained=True)
    python tools/infer.py exported/digits_ptnt my_digits/       # trained input size and class names
    python tools/export.py CKPT exported/digits_ptnt --push-to-hub my-org/digits-ptnt
    # uploads the folder with huggingface_hub (login first: huggingface-cli login);
    # then timm.create_model('hf-hub:my-org/digits-ptnt', pretrained=True) anywhere `zoo` is installed

config.json records the architecture, num_classes, label names, model arguments and the trained
input size / mean / std / crop; README.md is a model card in the Hub's format.
"""
import argparse
import json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="mmengine checkpoint (.pth) written by tools/train.py")
    p.add_argument("out_dir", help="output folder (must not exist, or be a previous export with --overwrite)")
    p.add_argument("--model-name", help="model name if the checkpoint meta has no config")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in OUT_DIR")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = p.parse_args(argv)

    from zoo.engine.export import export_checkpoint, push_to_hub

    card = dict(repo_id=args.push_to_hub) if args.push_to_hub else None
    path, info = export_checkpoint(args.checkpoint, args.out_dir, args.model_name, overwrite=args.overwrite,
                                   card=card)
    print(json.dumps(info, indent=2))
    print(f"load with: timm.create_model('local-dir:{info['folder']}', pretrained=True)  # after `import zoo`")
    if args.push_to_hub:
        url = push_to_hub(info["folder"], args.push_to_hub, private=args.private)
        print(f"uploaded to {url}; load with timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return path


if __name__ == "__main__":
    main()
