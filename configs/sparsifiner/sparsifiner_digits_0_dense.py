# Digits, step 0: train the dense teacher (plain DeiT attention, CE). A ViT trained from scratch on
# 1,437 images needs longer than the 8-epoch quickstart schedule: 20 epochs, 2 warmup.
#   python tools/train.py configs/sparsifiner/sparsifiner_digits_0_dense.py --work-dir work_dirs/sp_digits0
_base_ = ['./_digits_common.py']
model = dict(phase='dense')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=2, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=18, eta_min=1e-5, by_epoch=True, begin=2, end=20,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=20, val_interval=1)
