# GMM pit on tinyimagenet (64 px) with the reference recipe (see _recipe.py).
_base_ = ['./_tinyimagenet.py']
model = dict(model_name='gmm_pit_tiny_p4_64')
