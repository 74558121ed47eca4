# Focus-DETR R50 4-scale on COCO 2017, 12 epochs (detrex projects/focus_detr settings):
# torchvision ResNet-50 (timm resnet50.tv_in1k, frozen BN, stem frozen), ChannelMapper + GN, 6+6
# layers, 900 queries, 100 CDN queries (label noise 0.5, box noise 1.0), focus_rho 0.5, cascade
# [1.0, 0.8, 0.6, 0.6, 0.4, 0.2], OESM top-300; AdamW 1e-4 (backbone x0.1), wd 1e-4, grad clip 0.1,
# total batch 16 (2 images x 8 GPUs), lr x0.1 at epoch 11. Upstream reports 48.8 AP (val2017).
# Set `data_root` to a folder with annotations/instances_{train,val}2017.json, train2017/, val2017/.
_base_ = ['../_base_/default_runtime.py']
custom_imports = dict(imports=['zoo.engine', 'zoo.tasks.detection'], allow_failed_imports=False)

data_root = 'data/coco'
model = dict(
    type='TimmDetector',
    model_name='focus_detr_r50',
    num_classes=80,
    model_kwargs=dict(
        backbone_pretrained=True,  # torchvision weights, as detrex (r50_v1.pkl = torchvision)
        backbone='resnet50.tv_in1k',
        backbone_freeze_at=1,
        pos_temperature=10000,
        pos_offset=-0.5,
        num_queries=900,
        num_select=300,
        focus_rho=0.5,
        cascade=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
        topk_sa=300,
        dn_number=100,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
    ),
    criterion=dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, weight_class=1.0, weight_bbox=5.0,
                   weight_giou=2.0, weight_fg=1.5, focal_alpha=0.25, focal_gamma=2.0),
    data_preprocessor=dict(type='DetDataPreprocessor', size_divisor=32),
)
# DETR multi-scale training (shorter side 480-800, longer <= 1333, horizontal flip); upstream also
# uses a random crop, which is not implemented here.
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='CocoDetection', data_root=data_root, ann_file='annotations/instances_train2017.json',
                 img_prefix='train2017', scales=tuple(range(480, 801, 32)), max_size=1333, flip_prob=0.5,
                 filter_empty=True),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='CocoDetection', data_root=data_root, ann_file='annotations/instances_val2017.json',
                 img_prefix='val2017', scales=(800,), max_size=1333, test_mode=True),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric')
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={'model.backbone': dict(lr_mult=0.1)}),
    clip_grad=dict(max_norm=0.1, norm_type=2),
)
max_epochs = 12
param_scheduler = [dict(type='MultiStepLR', milestones=[11], gamma=0.1, by_epoch=True, begin=0, end=max_epochs)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=16, enable=False)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2, save_best='coco/bbox_mAP', rule='greater'),
)
