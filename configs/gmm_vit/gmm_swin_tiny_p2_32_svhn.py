# GMM swin on svhn (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_recipe.py']
model = dict(
    model_name='gmm_swin_tiny_p2_32',
    num_classes=10,
    data_preprocessor=dict(mean=(0.4377, 0.4438, 0.4728), std=(0.198, 0.201, 0.197)),
)
train_dataloader = dict(dataset=dict(type='SvhnDataset', data_root='data/svhn', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='SvhnDataset', data_root='data/svhn', split='val', augment=False))
test_dataloader = val_dataloader
