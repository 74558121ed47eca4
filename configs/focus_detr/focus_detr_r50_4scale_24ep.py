# Focus-DETR R50 4-scale, 24 epochs: lr x0.1 at epoch 20; position embedding temperature 20, offset 0
# (detrex 24/36-epoch configs). Upstream reports 50.3 AP (val2017).
_base_ = ['./focus_detr_r50_4scale_12ep.py']
model = dict(model_kwargs=dict(pos_temperature=20, pos_offset=0.0))
max_epochs = 24
param_scheduler = [dict(type='MultiStepLR', milestones=[20], gamma=0.1, by_epoch=True, begin=0, end=max_epochs)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
