# Sparsifiner LV-ViT-S, phase 2: the DeiT-S phase-2 recipe (keep 0.25, predictors frozen, 45
# epochs) against the dense LV-ViT-S teacher, as upstream does for LV-ViT: CE + 0.5 KL(teacher ||
# student) on the class-token head, + 0.5 MSE between the aux head's per-token logits
# (SparsifinerClassifier picks these views when both models have an aux head).
# Token pruning (off upstream and here) would be model_kwargs=dict(token_pruning_loc=(4, 8, 12),
# token_keep_rate_base=0.7) -- an untested recipe, not upstream's.
# Start from the phase-1 checkpoint:
#   python tools/train.py configs/sparsifiner/sparsifiner_lvvit_small_phase2_in1k.py \
#       --cfg-options load_from=work_dirs/sp_lv1/epoch_5.pth
_base_ = ['./sparsifiner_deit_small_phase2_in1k.py']
model = dict(
    model_name='sparsifiner_lvvit_s_224',
    # the dense teacher: the same architecture in dense mode with the TokenLabeling LV-ViT-S weights
    teacher_model_name='sparsifiner_lvvit_s_224.tl_in1k',
)
val_dataloader = dict(dataset=dict(transform_kwargs=dict(crop_pct=0.9)))
test_dataloader = val_dataloader
