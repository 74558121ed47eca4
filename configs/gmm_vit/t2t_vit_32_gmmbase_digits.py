# Quickstart: t2t_vit_32_gmmbase on scikit-learn's digits (32 px), the short CPU schedule (see _digits.py).
_base_ = ['./_digits.py']
model = dict(model_name='t2t_vit_32_gmmbase')
