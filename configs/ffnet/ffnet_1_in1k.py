# FFNet-1, ImageNet-1k at 256 px: upstream README command + train.py defaults (timm lineage).
# 8 GPUs x 128 = 1024 images per step; AdamW lr 1e-3, wd 0.05 (no decay on BN / biases / layer scale),
# 5 warmup epochs from lr 1e-6, cosine to 1e-5 over 300 epochs, then train.py's 20 timm cooldown
# epochs at 1e-5 (320 in all); no grad clipping; label smoothing 0.1; Mixup 0.2 (FFNet-1/2 command;
# default 0.8) / CutMix 1.0; RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.4, bicubic;
# random erasing 0.25; model EMA 0.9995; stochastic depth 0.1. Eval: center crop 0.9 at 256.
# Upstream trains with native AMP; switch optim_wrapper type to 'AmpOptimWrapper' on GPUs.
_base_ = [
    '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_adamw_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='ffnet_1',
    num_classes=1000,
    label_smoothing=0.1,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
    model_kwargs=dict(drop_path_rate=0.1),
)
train_dataloader = dict(batch_size=128, dataset=dict(img_size=256))
val_dataloader = dict(dataset=dict(img_size=256, transform_kwargs=dict(crop_pct=0.9)))
test_dataloader = val_dataloader
optim_wrapper = dict(clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=295, eta_min=1e-5, by_epoch=True, begin=5, end=300,
         convert_to_iter_based=True),
    # epochs 300-320: lr stays at eta_min (timm cooldown)
]
train_cfg = dict(by_epoch=True, max_epochs=320, val_interval=1)
custom_hooks = [dict(type='EMAHook', momentum=0.0005, update_buffers=True)]
