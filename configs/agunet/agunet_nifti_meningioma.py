# AGUNet (paper size: filters 16-32-128-256-256 [unverified against the released models], multi-scale
# input, deep supervision, attention gates) on your own NIfTI data:
#   data_root/{train,val}/images/<case>.nii.gz  and  data_root/{train,val}/labels/<case>.nii.gz
# Volumes are resampled to isotropic spacing, clipped to the 0-99.5 percentiles, scaled to [0, 1] and
# resized to 128x128x144 (upstream's whole-volume setting). Needs a GPU; point both loaders at your data:
#   python tools/train.py configs/agunet/agunet_nifti_meningioma.py --cfg-options \
#       train_dataloader.dataset.data_root=/data/mri val_dataloader.dataset.data_root=/data/mri
# Switch model_name to 'dagunet_3d' for the dual-attention guided variant.
_base_ = ['../_base_/default_runtime.py']

data_root = 'data/meningioma'
size = (128, 128, 144)
model = dict(
    type='Segmentation3DModel',
    model_name='agunet_3d',
    num_classes=2,
    model_kwargs=dict(),
    threshold=0.4,
    data_preprocessor=dict(type='Seg3dDataPreprocessor'),
)
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='NiftiSegDataset', data_root=data_root, split='train', size=size, augment=True),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='NiftiSegDataset', data_root=data_root, split='val', size=size),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='SegDetectionMetric', dice_threshold=0.1)
test_evaluator = val_evaluator

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=1e-3))
max_epochs = 100
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-6)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=2, save_best='seg3d/dice', rule='greater'),
)
