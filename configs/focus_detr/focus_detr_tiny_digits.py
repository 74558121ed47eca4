# Focus-DETR (tiny: test_resnet features, d=64, 2+2 layers, 100 queries) trained from scratch on the
# embedded digits detection set (scikit-learn's real 8x8 digits pasted on 96-144 px canvases,
# generated deterministically on first use; 240 train / 60 val images, 10 classes). CPU-sized:
# 480 iterations; measured val mAP 0.231 / AP50 0.332 after this schedule (model_cards/focus_detr.md).
# On a shared CPU run it with OMP_NUM_THREADS=1.
_base_ = ['../_base_/default_runtime.py']
custom_imports = dict(imports=['zoo.engine', 'zoo.tasks.detection'], allow_failed_imports=False)

model = dict(
    type='TimmDetector',
    model_name='focus_detr_tiny',
    num_classes=10,
    model_kwargs=dict(),
    criterion=dict(),
    data_preprocessor=dict(type='DetDataPreprocessor', size_divisor=32),
)
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='DigitsDetection', split='train', scales=(112, 128), max_size=160, flip_prob=0.0),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='DigitsDetection', split='val', scales=(128,), max_size=160),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric')
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
)
max_epochs = 8
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=60),
    dict(type='MultiStepLR', milestones=[7], gamma=0.1, by_epoch=True, begin=0, end=max_epochs),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=1, save_best='coco/bbox_mAP',
                    rule='greater'),
)
