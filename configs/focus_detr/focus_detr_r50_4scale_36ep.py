# Focus-DETR R50 4-scale, 36 epochs: detrex's 36-epoch config uses its 24/36 schedule helper with the
# decay at epoch 20 (coco_schedule default_coco_scheduler(36, 20, 0)); temperature 20, offset 0.
# Upstream reports 50.4 AP (val2017).
_base_ = ['./focus_detr_r50_4scale_12ep.py']
model = dict(model_kwargs=dict(pos_temperature=20, pos_offset=0.0))
max_epochs = 36
param_scheduler = [dict(type='MultiStepLR', milestones=[20], gamma=0.1, by_epoch=True, begin=0, end=max_epochs)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
