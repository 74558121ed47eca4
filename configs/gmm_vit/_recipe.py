# The reference recipe of the GMM-attention paper (CatworldLee/Gaussian-Mixture-Mask-Attention main.py
# defaults): 100 epochs with 10 linear warm-up epochs then cosine, AdamW lr 1e-3 / wd 0.05, batch 128,
# label smoothing 0.1, Mixup / CutMix (alpha 1, switched 50/50), AutoAugment (dataset policy, in the
# dataset classes of zoo/engine/datasets.py), repeated augmentation x3, random erasing 0.25,
# stochastic depth 0.1. The reference mixes only half of the batches (mix_prob 0.5).
# Datasets and their loaders come from configs/_base_/datasets; _<dataset>.py puts the two together.
_base_ = ['../_base_/default_runtime.py']

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=10, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=90, eta_min=1e-5, by_epoch=True, begin=10, end=100,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
val_cfg = dict()
test_cfg = dict()

model = dict(
    type='TimmClassifier',
    label_smoothing=0.1,
    mixup_alpha=1.0,
    cutmix_alpha=1.0,
    switch_prob=0.5,
    mix_prob=0.5,
    model_kwargs=dict(drop_path_rate=0.1),
    data_preprocessor=dict(type='ClsDataPreprocessor', random_erasing=dict(probability=0.25, mode='const')),
)
