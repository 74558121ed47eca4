# Quickstart: BiFormer-T on the sklearn digits (32 px upsampled to 64 px so every stage has a map:
# 16/8/4/2 tokens per side; maps are padded to the 7x7 region grid and the padding is masked).
_base_ = [
    '../_base_/datasets/digits.py',
    '../_base_/schedules/digits.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='biformer_tiny',
    num_classes=10,
    model_kwargs=dict(drop_path_rate=0.0),
)
train_dataloader = dict(dataset=dict(img_size=64))
val_dataloader = dict(dataset=dict(img_size=64))
test_dataloader = val_dataloader
