# Quickstart: a small TNT on the sklearn digits (32 px): 8x8 sentences of 4x4 words (stride-2
# word conv), 4 blocks, 192 / 12 wide. One epoch ran end to end (tools/train.py) on a heavily
# shared 2-core machine at ~18 s/iteration; the full 8-epoch accuracy was not measured.
_base_ = [
    '../_base_/datasets/digits.py',
    '../_base_/schedules/digits.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='tnt_s_patch16_224_zoo',
    num_classes=10,
    model_kwargs=dict(img_size=32, patch_size=8, inner_stride=2, embed_dim=192, inner_dim=12, depth=4,
                      num_heads=3, inner_num_heads=3, drop_path_rate=0.0),
)
