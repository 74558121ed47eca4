# baseline t2t on svhn (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_svhn.py']
model = dict(model_name='t2t_vit_32_gmmbase')
