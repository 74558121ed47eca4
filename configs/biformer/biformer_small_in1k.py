# BiFormer-S, ImageNet-1k: the tiny recipe with stochastic depth 0.15 (upstream README command).
_base_ = ['./biformer_tiny_in1k.py']
model = dict(model_name='biformer_small', model_kwargs=dict(drop_path_rate=0.15))
