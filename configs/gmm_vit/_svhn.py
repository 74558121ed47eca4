# The reference recipe (_recipe.py) on SVHN: repeated augmentation x3, the dataset's classes and normalisation.
_base_ = ['../_base_/datasets/svhn.py', './_recipe.py']
train_dataloader = dict(sampler=dict(type='RepeatAugSampler', repeats=3))
model = dict(num_classes={{_base_.num_classes}}, data_preprocessor={{_base_.normalization}})
