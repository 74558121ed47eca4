# GMM t2t on cifar100 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_cifar100.py']
model = dict(model_name='gmm_t2t_vit_32')
