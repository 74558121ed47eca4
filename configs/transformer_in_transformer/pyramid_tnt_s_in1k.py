# PyramidTNT-S, ImageNet-1k at 256 px, the official recipe (tnt_pytorch readme): the TNT recipe
# with 20 warmup epochs (the shared 300-epoch schedule's default), stochastic depth 0.1.
_base_ = [
    '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_adamw_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='pyramid_tnt_s',
    num_classes=1000,
    model_kwargs=dict(drop_path_rate=0.1),
)
optim_wrapper = dict(
    clip_grad=None,
    paramwise_cfg=dict(custom_keys={
        'outer_pos': dict(decay_mult=0.0),
        'inner_pos': dict(decay_mult=0.0),
        'relative_pos': dict(decay_mult=0.0),
    }),
)
train_dataloader = dict(dataset=dict(img_size=256))
val_dataloader = dict(dataset=dict(img_size=256, transform_kwargs=dict(interpolation='bicubic', crop_pct=0.9)))
test_dataloader = val_dataloader
