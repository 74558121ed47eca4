"""Export a training checkpoint as timm's Hugging Face Hub folder (config.json, model.safetensors, README.md).

The ``zoo-export`` command of an installed wheel; the code lives in zoo/cli/export.py.
"""
import importlib.util
import os.path as osp
import sys

if importlib.util.find_spec("zoo") is None:  # not installed: use this checkout
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from zoo.cli.export import main  # noqa: E402

if __name__ == "__main__":
    main()
