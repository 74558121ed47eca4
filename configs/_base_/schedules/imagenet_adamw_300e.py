# The ImageNet-1k recipe most of the zoo's papers train with (DeiT / Swin lineage):
# 300 epochs, AdamW (lr 1e-3 at total batch 1024, wd 0.05, no decay on norms, biases and
# position/token embeddings), 20 linear warmup epochs then cosine to 1e-5, grad clip 5,
# label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment (dataset config), random erasing 0.25,
# stochastic depth 0.1 (set drop_path_rate per model size in the family config).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            'pos_embed': dict(decay_mult=0.0),
            'cls_token': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
        },
    ),
    clip_grad=dict(max_norm=5.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=280, eta_min=1e-5, by_epoch=True, begin=20, end=300,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()
# lr above is for a total batch of 1024; `tools/train.py --auto-scale-lr` rescales it linearly.
auto_scale_lr = dict(base_batch_size=1024, enable=False)

model = dict(
    label_smoothing=0.1,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    model_kwargs=dict(drop_path_rate=0.1),
    data_preprocessor=dict(type='ClsDataPreprocessor', random_erasing=dict(probability=0.25, mode='pixel')),
)
