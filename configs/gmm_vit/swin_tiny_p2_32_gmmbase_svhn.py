# baseline swin on svhn (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_svhn.py']
model = dict(model_name='swin_tiny_p2_32_gmmbase')
