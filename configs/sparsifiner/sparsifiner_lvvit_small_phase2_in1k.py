# Sparsifiner LV-ViT-S, phase 2: sparse attention at keep rate 0.25, predictors frozen, backbone
# trained against the dense LV-ViT-S teacher as upstream does for LV-ViT: CE + 0.5 KL(teacher ||
# student) on the class-token head, + 0.5 MSE between the aux head's per-token logits
# (SparsifinerClassifier picks these views when both models have an aux head).
# 45 epochs, lr 8e-5 -> 2e-6 cosine, 3 warmup epochs, wd 0.05 (upstream default config).
# Token pruning (off upstream and here) would be model_kwargs=dict(token_pruning_loc=(4, 8, 12),
# token_keep_rate_base=0.7) -- an untested recipe, not upstream's.
# Start from the phase-1 checkpoint:
#   python tools/train.py configs/sparsifiner/sparsifiner_lvvit_small_phase2_in1k.py \
#       --cfg-options load_from=work_dirs/sp_lv1/epoch_5.pth
_base_ = ['../_base_/datasets/imagenet.py', '../_base_/schedules/imagenet_adamw_300e.py',
          '../_base_/default_runtime.py']
model = dict(
    _delete_=True,
    type='SparsifinerClassifier',
    model_name='sparsifiner_lvvit_s_224',
    num_classes=1000,
    phase='backbone',
    keep_rate=0.25,
    kd_weight=0.5,
    token_weight=0.5,
    # the dense teacher: the same architecture in dense mode with the TokenLabeling LV-ViT-S weights
    teacher_model_name='sparsifiner_lvvit_s_224.tl_in1k',
    label_smoothing=0.1,
    data_preprocessor=dict(type='ClsDataPreprocessor', random_erasing=dict(probability=0.25, mode='pixel')),
)
optim_wrapper = dict(optimizer=dict(lr=8e-5, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=3, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=42, eta_min=2e-6, by_epoch=True, begin=3, end=45,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=45, val_interval=1)
train_dataloader = dict(batch_size=168)
val_dataloader = dict(batch_size=168, dataset=dict(transform_kwargs=dict(crop_pct=0.9)))
test_dataloader = val_dataloader
auto_scale_lr = dict(base_batch_size=168 * 8, enable=False)
load_from = None  # set to the phase-1 checkpoint
