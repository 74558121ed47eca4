# HaloNet-H0 (paper family) on ImageNet-1k at the paper's H0 resolution, 256 px. No weights were
# released for H0-H7; the paper's optimiser settings could not be checked offline, so this uses
# the zoo's AdamW 300-epoch recipe. For H3-H7 change model_name and img_size (320 / 384 / 448 /
# 512 / 640, see model_cards/halonet.md).
_base_ = [
    '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_adamw_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='halonet_h0',
    num_classes=1000,
    model_kwargs=dict(drop_path_rate=0.1),
)
train_dataloader = dict(dataset=dict(img_size=256))
val_dataloader = dict(dataset=dict(img_size=256))
test_dataloader = val_dataloader
