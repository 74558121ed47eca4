# Puppeteer skinning network (small: dim 64, one block, 4 x 16 heads, TAJA bias) trained from scratch on
# the embedded procedural articulated shapes (chains and trees of capsules, 3-12 joints, smooth
# ground-truth skin weights; 256 train / 64 val shapes of 256 surface points, generated
# deterministically on first use). CPU-sized: 20 epochs x 32 iterations; metrics in
# model_cards/puppeteer.md. On a shared CPU run it with OMP_NUM_THREADS=1.
_base_ = ['../_base_/default_runtime.py']

max_joints = 12
model = dict(
    type='SkinningModel',
    model_name='puppeteer_skin_small',
    # upstream initialises the cosine-logit scale at 1.0 (near-uniform weights at start); the short CPU
    # schedule starts it at 10 instead
    model_kwargs=dict(scale_init=10.0),
    data_preprocessor=dict(type='RiggingDataPreprocessor'),
)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ArticulatedShapesDataset', split='train', num_points=256, num_shape_points=64,
                 max_joints=max_joints),
)
val_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ArticulatedShapesDataset', split='val', num_points=256, num_shape_points=64,
                 max_joints=max_joints),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='SkinningMetric', filter_thre=0.15)
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    clip_grad=dict(max_norm=1.0, norm_type=2),
)
max_epochs = 20
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=32),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=10)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=16),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=1, save_best='skin/avg_l1',
                    rule='less'),
)
