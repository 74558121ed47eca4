# GMM pit on cifar10 (32 px) with the reference recipe (see _recipe.py).
_base_ = ['./_cifar10.py']
model = dict(model_name='gmm_pit_tiny_p2_32')
