# GMM vit on cifar100 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_recipe.py']
model = dict(
    model_name='gmm_vit_tiny_p4_32',
    num_classes=100,
    data_preprocessor=dict(mean=(0.507, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
)
train_dataloader = dict(dataset=dict(type='Cifar100Dataset', data_root='data/cifar', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='Cifar100Dataset', data_root='data/cifar', split='val', augment=False))
test_dataloader = val_dataloader
