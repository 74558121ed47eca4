# FFNet-2, ImageNet-1k at 256 px: the FFNet-1 recipe with stochastic depth 0.15 (README command).
_base_ = ['./ffnet_1_in1k.py']
model = dict(model_name='ffnet_2', model_kwargs=dict(drop_path_rate=0.15))
