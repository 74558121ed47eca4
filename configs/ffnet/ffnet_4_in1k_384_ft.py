# FFNet-4 fine-tuned at 384 px (README command): the FFNet-3 384 recipe with stochastic depth 0.5.
# Upstream released no 256-px FFNet-4 weights: set load_from to your own 256-px FFNet-4 checkpoint
# (trained with ffnet_1_in1k.py, model_name='ffnet_4'), otherwise this starts from random init.
_base_ = ['./ffnet_3_in1k_384_ft.py']
model = dict(model_name='ffnet_4', pretrained=False, model_kwargs=dict(drop_path_rate=0.5))
load_from = None
