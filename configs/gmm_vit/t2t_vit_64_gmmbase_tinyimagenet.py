# baseline t2t on tinyimagenet (64 px) with the reference recipe (see _recipe.py).
_base_ = ['./_tinyimagenet.py']
model = dict(model_name='t2t_vit_64_gmmbase')
