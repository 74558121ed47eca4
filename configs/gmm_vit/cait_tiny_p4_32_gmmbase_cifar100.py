# baseline cait on cifar100 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_cifar100.py']
model = dict(model_name='cait_tiny_p4_32_gmmbase')
