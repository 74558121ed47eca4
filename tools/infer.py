"""Classify (or detect in) image files or folders with a checkpoint or a pretrained model; prints the results.

The ``zoo-infer`` command of an installed wheel; the code lives in zoo/cli/infer.py.
"""
import importlib.util
import os.path as osp
import sys

if importlib.util.find_spec("zoo") is None:  # not installed: use this checkout
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from zoo.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    main()
