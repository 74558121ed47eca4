# CIFAR-10, python version (data/cifar/cifar-10-batches-py): 32 px, 10 classes, 50k train / 10k val.
_base_ = ['./small_image_loaders.py']
num_classes = 10
normalization = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
train_dataloader = dict(dataset=dict(type='Cifar10Dataset', data_root='data/cifar', split='train', augment=True))
val_dataloader = dict(dataset=dict(type='Cifar10Dataset', data_root='data/cifar', split='val', augment=False))
test_dataloader = val_dataloader
