# baseline cait on cifar10 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_cifar10.py']
model = dict(model_name='cait_tiny_p4_32_gmmbase')
