# BiFormer-T, ImageNet-1k, the paper's recipe (DeiT lineage, upstream main.py defaults): 300 epochs
# AdamW lr 5e-4 per 512 images (1e-3 at the upstream total batch 1024 = 8 GPUs x 128), wd 0.05,
# 5 warmup epochs, cosine to 1e-5, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment
# m9-mstd0.5, random erasing 0.25, stochastic depth 0.1 (README: S uses 0.15), no grad clipping.
_base_ = [
    '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_adamw_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='biformer_tiny',
    num_classes=1000,
    model_kwargs=dict(drop_path_rate=0.1),
)
optim_wrapper = dict(clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=295, eta_min=1e-5, by_epoch=True, begin=5, end=300,
         convert_to_iter_based=True),
]
