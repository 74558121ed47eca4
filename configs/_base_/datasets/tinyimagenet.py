# Tiny-ImageNet (data/tiny-imagenet-200): 64 px, 200 classes, 100k train / 10k val.
_base_ = ['./small_image_loaders.py']
num_classes = 200
normalization = dict(mean=(0.4802, 0.4481, 0.3975), std=(0.277, 0.2691, 0.2821))
train_dataloader = dict(dataset=dict(type='TinyImageNetDataset', data_root='data/tiny-imagenet-200', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='TinyImageNetDataset', data_root='data/tiny-imagenet-200', split='val', augment=False))
test_dataloader = val_dataloader
