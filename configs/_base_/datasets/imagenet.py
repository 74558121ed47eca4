# ImageNet-1k as folders: data/imagenet/{train,val}/<wnid>/*.JPEG (point data_root elsewhere with
# --cfg-options train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...).
# Images stay uint8 here; the model's data preprocessor normalises with the model's mean/std.
train_dataloader = dict(
    batch_size=128,  # per GPU; 8 GPUs x 128 = 1024, the recipe's batch
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='ImageFolderDataset',
        data_root='data/imagenet',
        split='train',
        img_size=224,
        transform_kwargs=dict(auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', color_jitter=0.4),
    ),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='ImageFolderDataset',
        data_root='data/imagenet',
        split='val',
        img_size=224,
        transform_kwargs=dict(interpolation='bicubic', crop_pct=0.875),
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator
