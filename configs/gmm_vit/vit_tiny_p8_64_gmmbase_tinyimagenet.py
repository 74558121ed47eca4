# baseline vit on tinyimagenet (64 px) with the reference recipe (see _recipe.py).
_base_ = ['./_recipe.py']
model = dict(
    model_name='vit_tiny_p8_64_gmmbase',
    num_classes=200,
    data_preprocessor=dict(mean=(0.4802, 0.4481, 0.3975), std=(0.277, 0.2691, 0.2821)),
)
train_dataloader = dict(dataset=dict(type='TinyImageNetDataset', data_root='data/tiny-imagenet-200', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='TinyImageNetDataset', data_root='data/tiny-imagenet-200', split='val', augment=False))
test_dataloader = val_dataloader
