"""Convert an upstream checkpoint into a zoo weights file: validated, hashed, safetensors.

The ``zoo-convert`` command of an installed wheel; the code lives in zoo/cli/convert.py.
"""
import importlib.util
import os.path as osp
import sys

if importlib.util.find_spec("zoo") is None:  # not installed: use this checkout
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from zoo.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
