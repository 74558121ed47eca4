# Sparsifiner LV-ViT-S, phase 1 (upstream `sparsifiner_lvvit` with sparsifiner_default_config): the
# DeiT-S phase-1 recipe (predictors only, MSE weight 0.01, backbone frozen, 5 epochs) on the
# TokenLabeling LV-ViT-S ImageNet weights (lvvit_s-26M-224-83.3); predictor rank 197 // 6 = 32,
# keep rate 0.25. LV-ViT evaluates at crop 0.9 (TokenLabeling's cfg).
#   python tools/train.py configs/sparsifiner/sparsifiner_lvvit_small_phase1_in1k.py --work-dir work_dirs/sp_lv1
_base_ = ['./sparsifiner_deit_small_phase1_in1k.py']
model = dict(model_name='sparsifiner_lvvit_s_224.tl_in1k')
val_dataloader = dict(dataset=dict(transform_kwargs=dict(crop_pct=0.9)))
test_dataloader = val_dataloader
