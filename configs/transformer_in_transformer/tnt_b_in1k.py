# TNT-B, ImageNet-1k: the TNT-S recipe (tnt_s_in1k.py) with the base model.
_base_ = ['./tnt_s_in1k.py']
model = dict(model_name='tnt_b_patch16_224_zoo')
