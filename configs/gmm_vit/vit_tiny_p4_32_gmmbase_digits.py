# Quickstart: vit_tiny_p4_32_gmmbase on scikit-learn's digits (32 px, no download), the short CPU schedule.
# tools/bench_gmm_vit.py runs the GMM-vs-baseline comparison reported in model_cards/gmm_vit.md.
_base_ = [
    '../_base_/datasets/digits.py',
    '../_base_/schedules/digits.py',
    '../_base_/default_runtime.py',
]
model = dict(type='TimmClassifier', model_name='vit_tiny_p4_32_gmmbase', num_classes=10, label_smoothing=0.1,
             model_kwargs=dict(drop_path_rate=0.0))
default_hooks = dict(logger=dict(interval=10))
