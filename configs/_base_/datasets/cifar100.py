# CIFAR-100, python version (data/cifar/cifar-100-python): 32 px, 100 classes, 50k train / 10k val.
_base_ = ['./small_image_loaders.py']
num_classes = 100
normalization = dict(mean=(0.507, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
train_dataloader = dict(dataset=dict(type='Cifar100Dataset', data_root='data/cifar', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='Cifar100Dataset', data_root='data/cifar', split='val', augment=False))
test_dataloader = val_dataloader
