# Quickstart: gmm_vit_tiny_p4_32 on scikit-learn's digits (32 px), the short CPU schedule (see _digits.py).
_base_ = ['./_digits.py']
model = dict(model_name='gmm_vit_tiny_p4_32')
