"""Evaluate a checkpoint, or a model's published pretrained weights, on a config's test set.

The ``zoo-test`` command of an installed wheel; the code lives in zoo/cli/test.py.
"""
import importlib.util
import os.path as osp
import sys

if importlib.util.find_spec("zoo") is None:  # not installed: use this checkout
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from zoo.cli.test import main  # noqa: E402

if __name__ == "__main__":
    main()
