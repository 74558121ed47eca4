# baseline vit on svhn (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_svhn.py']
model = dict(model_name='vit_tiny_p4_32_gmmbase')
