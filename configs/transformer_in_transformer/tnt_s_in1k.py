# TNT-S, ImageNet-1k, the official recipe (tnt_pytorch readme, DeiT lineage): 300 epochs AdamW
# lr 1e-3 at total batch 1024 (8 GPUs x 128), wd 0.05, 5 warmup epochs from 1e-6, cosine,
# label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment m9-mstd0.5-inc1, colour jitter 0.4,
# random erasing 0.25 (pixel), stochastic depth 0.1, no gradient clipping. Upstream also used
# repeated augmentation and model EMA (0.99996), which the base pipeline does not provide.
# Inputs are normalised with mean = std = 0.5 (the model's pretrained cfg).
_base_ = [
    '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_adamw_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='tnt_s_patch16_224_zoo',
    num_classes=1000,
    model_kwargs=dict(drop_path_rate=0.1),
)
optim_wrapper = dict(
    clip_grad=None,
    paramwise_cfg=dict(custom_keys={
        'outer_pos': dict(decay_mult=0.0),
        'inner_pos': dict(decay_mult=0.0),
        'cls_token': dict(decay_mult=0.0),
    }),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=295, eta_min=1e-5, by_epoch=True, begin=5, end=300,
         convert_to_iter_based=True),
]
val_dataloader = dict(dataset=dict(transform_kwargs=dict(interpolation='bicubic', crop_pct=0.9)))
test_dataloader = val_dataloader
