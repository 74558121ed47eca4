# FFNet-3, ImageNet-1k at 256 px: the FFNet-1 recipe with Mixup at train.py's default 0.8 (the README
# command passes no --mixup), stochastic depth 0.35, eval crop 0.95 (upstream cfg).
_base_ = ['./ffnet_1_in1k.py']
model = dict(model_name='ffnet_3', mixup_alpha=0.8, model_kwargs=dict(drop_path_rate=0.35))
val_dataloader = dict(dataset=dict(transform_kwargs=dict(crop_pct=0.95)))
test_dataloader = val_dataloader
