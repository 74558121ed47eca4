# halonet50ts_zoo on ImageNet-1k, 256 px, eval crop 0.94 (timm's cfg for halonet50ts.a1h_in1k);
# same recipe caveat as halonet26t_zoo_in1k.py.
_base_ = ['./halonet26t_zoo_in1k.py']
model = dict(model_name='halonet50ts_zoo', model_kwargs=dict(drop_path_rate=0.1))
val_dataloader = dict(dataset=dict(transform_kwargs=dict(interpolation='bicubic', crop_pct=0.94)))
test_dataloader = val_dataloader
