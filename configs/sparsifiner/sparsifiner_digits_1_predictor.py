# Digits, phase 1: train only the connectivity predictors against the dense attention (backbone
# frozen at the step-0 teacher).
#   python tools/train.py configs/sparsifiner/sparsifiner_digits_1_predictor.py --work-dir work_dirs/sp_digits1 \
#       --cfg-options load_from=work_dirs/sp_digits0/epoch_20.pth
_base_ = ['./_digits_common.py']
model = dict(phase='predictor', recon_weight=0.01)
optim_wrapper = dict(optimizer=dict(lr=3e-3, weight_decay=0.0))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=3, eta_min=1e-4, by_epoch=True, begin=0, end=3,
                        convert_to_iter_based=True)]
train_cfg = dict(by_epoch=True, max_epochs=3, val_interval=1)
