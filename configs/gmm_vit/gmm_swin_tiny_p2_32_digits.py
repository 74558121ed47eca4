# Quickstart: gmm_swin_tiny_p2_32 on scikit-learn's digits (32 px), the short CPU schedule (see _digits.py).
_base_ = ['./_digits.py']
model = dict(model_name='gmm_swin_tiny_p2_32')
