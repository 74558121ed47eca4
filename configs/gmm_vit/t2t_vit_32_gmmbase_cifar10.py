# baseline t2t on cifar10 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_cifar10.py']
model = dict(model_name='t2t_vit_32_gmmbase')
