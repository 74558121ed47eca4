# SVHN cropped digits (data/svhn/{train,test}_32x32.mat): 32 px, 10 classes, 73k train / 26k val (test split).
_base_ = ['./small_image_loaders.py']
num_classes = 10
normalization = dict(mean=(0.4377, 0.4438, 0.4728), std=(0.198, 0.201, 0.197))
train_dataloader = dict(dataset=dict(type='SvhnDataset', data_root='data/svhn', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='SvhnDataset', data_root='data/svhn', split='val', augment=False))
test_dataloader = val_dataloader
