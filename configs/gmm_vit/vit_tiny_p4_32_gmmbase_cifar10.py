# baseline vit on cifar10 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_recipe.py']
model = dict(
    model_name='vit_tiny_p4_32_gmmbase',
    num_classes=10,
    data_preprocessor=dict(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616)),
)
train_dataloader = dict(dataset=dict(type='Cifar10Dataset', data_root='data/cifar', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='Cifar10Dataset', data_root='data/cifar', split='val', augment=False))
test_dataloader = val_dataloader
