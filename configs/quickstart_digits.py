# Quickstart: train a small zoo model (PyramidTNT-Ti) on scikit-learn's real handwritten digits (no download).
#   python tools/train.py configs/quickstart_digits.py
# About 2-3 minutes on 2 CPU cores to >= 95% val top-1 (see README).
_base_ = [
    './_base_/datasets/digits.py',
    './_base_/schedules/digits.py',
    './_base_/default_runtime.py',
]
model = dict(type='TimmClassifier', model_name='pyramid_tnt_ti', num_classes=10)
default_hooks = dict(logger=dict(interval=10))
