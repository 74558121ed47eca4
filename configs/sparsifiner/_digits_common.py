# Shared by the three digits configs: a small Sparsifiner (d 64, 2 heads of 32, depth 4) on 32 px
# digits, patch 4 -> 8x8 grid + cls = 65 tokens, keep rate 0.25 -> 17 keys per query.
_base_ = ['../_base_/datasets/digits.py', '../_base_/schedules/digits.py', '../_base_/default_runtime.py']
_model_kwargs = dict(img_size=32, patch_size=4, embed_dim=64, num_heads=2, depth=4)
model = dict(type='SparsifinerClassifier', model_name='sparsifiner_deit_tiny_patch16_224', num_classes=10,
             keep_rate=0.25, model_kwargs=_model_kwargs)
default_hooks = dict(logger=dict(interval=10))
optim_wrapper = dict(optimizer=dict(lr=2e-3))
