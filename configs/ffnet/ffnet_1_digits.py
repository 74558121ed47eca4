# Quickstart: FFNet-1 on the sklearn digits, upsampled to 64 px so the stride-32 network ends on a
# 2x2 map (at 32 px the last stage would see a single pixel). CPU-sized schedule from the base.
_base_ = [
    '../_base_/datasets/digits.py',
    '../_base_/schedules/digits.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='ffnet_1',
    num_classes=10,
    model_kwargs=dict(drop_path_rate=0.0),
)
train_dataloader = dict(dataset=dict(img_size=64))
val_dataloader = dict(dataset=dict(img_size=64))
test_dataloader = val_dataloader
