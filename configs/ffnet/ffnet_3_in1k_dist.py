# FFNet-3 with hard distillation (see ffnet_1_in1k_dist.py): stochastic depth 0.2, eval crop 0.95.
_base_ = ['./ffnet_1_in1k_dist.py']
model = dict(model_name='ffnet_3', model_kwargs=dict(drop_path_rate=0.2))
val_dataloader = dict(dataset=dict(transform_kwargs=dict(crop_pct=0.95)))
test_dataloader = val_dataloader
