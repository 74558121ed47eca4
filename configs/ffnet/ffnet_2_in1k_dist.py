# FFNet-2 with hard distillation (see ffnet_1_in1k_dist.py): stochastic depth 0.08.
_base_ = ['./ffnet_1_in1k_dist.py']
model = dict(model_name='ffnet_2', model_kwargs=dict(drop_path_rate=0.08))
