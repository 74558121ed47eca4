# Sparsifiner LV-ViT-S, phase 1 (upstream `sparsifiner_lvvit` with sparsifiner_default_config): train
# only the connectivity predictors to reconstruct the dense attention rows (MSE sum, weight 0.01),
# backbone frozen at the TokenLabeling LV-ViT-S ImageNet weights (lvvit_s-26M-224-83.3), attention
# dense. 5 epochs, lr 3e-4 -> 2e-4, 3 warmup epochs; predictor rank 197 // 6 = 32, keep rate 0.25.
#   python tools/train.py configs/sparsifiner/sparsifiner_lvvit_small_phase1_in1k.py --work-dir work_dirs/sp_lv1
_base_ = ['../_base_/datasets/imagenet.py', '../_base_/schedules/imagenet_adamw_300e.py',
          '../_base_/default_runtime.py']
model = dict(
    _delete_=True,
    type='SparsifinerClassifier',
    model_name='sparsifiner_lvvit_s_224.tl_in1k',
    pretrained=True,
    num_classes=1000,
    phase='predictor',
    keep_rate=0.25,
    recon_weight=0.01,
    data_preprocessor=dict(type='ClsDataPreprocessor'),
)
optim_wrapper = dict(optimizer=dict(lr=3e-4, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=3, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=2, eta_min=2e-4, by_epoch=True, begin=3, end=5,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=5, val_interval=1)
# upstream batch: 168 per GPU; LV-ViT evaluates at crop 0.9 (TokenLabeling's cfg)
train_dataloader = dict(batch_size=168)
val_dataloader = dict(batch_size=168, dataset=dict(transform_kwargs=dict(crop_pct=0.9)))
test_dataloader = val_dataloader
auto_scale_lr = dict(base_batch_size=168 * 8, enable=False)
