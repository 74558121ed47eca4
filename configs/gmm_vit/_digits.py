# The quickstart for the GMM hosts: scikit-learn's digits (32 px, no download) on the short CPU
# schedule; model_cards/gmm_vit.md reports the GMM-vs-baseline comparison it gives.
_base_ = [
    '../_base_/datasets/digits.py',
    '../_base_/schedules/digits.py',
    '../_base_/default_runtime.py',
]
model = dict(type='TimmClassifier', num_classes=10, label_smoothing=0.1, model_kwargs=dict(drop_path_rate=0.0))
default_hooks = dict(logger=dict(interval=10))
