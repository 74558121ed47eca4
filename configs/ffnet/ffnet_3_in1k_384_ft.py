# FFNet-3 fine-tuned at 384 px from the released 256-px weights (README command): 30 epochs, 8 GPUs x
# 64, AdamW at a constant lr 5e-6 (no warmup, --sched none), wd 1e-8, stochastic depth 0.4, the
# other augmentations at train.py defaults (Mixup 0.8 / CutMix 1.0, RandAugment, erasing 0.25),
# EMA 0.9995. Eval: center crop 1.0 (train.py sets it for --finetune runs).
_base_ = ['./ffnet_1_in1k.py']
model = dict(
    model_name='ffnet_3.in1k_256',
    pretrained=True,
    mixup_alpha=0.8,
    model_kwargs=dict(drop_path_rate=0.4),
)
train_dataloader = dict(batch_size=64, dataset=dict(img_size=384))
val_dataloader = dict(dataset=dict(img_size=384, transform_kwargs=dict(crop_pct=1.0)))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=5e-6, weight_decay=1e-8))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True, begin=0, end=30)]
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
auto_scale_lr = dict(base_batch_size=512, enable=False)
