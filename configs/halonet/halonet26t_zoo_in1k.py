# halonet26t_zoo on ImageNet-1k at timm's resolution for this model (train and eval 256 px, eval
# crop 0.95, bicubic) so timm's released halonet26t.a1h_in1k weights and a re-training compare.
# timm's card for those weights gives its recipe only in outline ("ResNet Strikes Back A1 based,
# LAMB, stronger dropout / stochastic depth / RandAugment, cosine LR with warmup"; no exact
# values published) and zoo.engine registers no LAMB optimizer, so this config keeps the zoo's
# AdamW 300-epoch recipe (configs/_base_/schedules/imagenet_adamw_300e.py) with the 256 px input.
_base_ = [
    '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_adamw_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='halonet26t_zoo',
    num_classes=1000,
    model_kwargs=dict(drop_path_rate=0.05),
)
train_dataloader = dict(dataset=dict(img_size=256))
val_dataloader = dict(dataset=dict(img_size=256, transform_kwargs=dict(interpolation='bicubic', crop_pct=0.95)))
test_dataloader = val_dataloader
