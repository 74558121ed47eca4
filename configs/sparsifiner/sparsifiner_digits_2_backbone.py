# Digits, phase 2: sparse attention (keep 0.25), predictors frozen, backbone fine-tuned with
# CE + 0.5 KL + 0.5 token MSE against a frozen dense copy of the loaded (step-0) backbone.
#   python tools/train.py configs/sparsifiner/sparsifiner_digits_2_backbone.py --work-dir work_dirs/sp_digits2 \
#       --cfg-options load_from=work_dirs/sp_digits1/epoch_3.pth
_base_ = ['./_digits_common.py']
model = dict(phase='backbone', kd_weight=0.5, token_weight=0.5)
optim_wrapper = dict(optimizer=dict(lr=3e-4, weight_decay=0.05))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=3, eta_min=1e-5, by_epoch=True, begin=0, end=3,
                        convert_to_iter_based=True)]
train_cfg = dict(by_epoch=True, max_epochs=3, val_interval=1)
