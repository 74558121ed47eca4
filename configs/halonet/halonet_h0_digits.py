# Quickstart: HaloNet-H0 on scikit-learn's digits (no download), at the dataset's 32 px.
# The paper's 8 px blocks need large maps (at 32 px the stage maps are 8 / 4 / 2 / 1 px, mostly
# padding), so this config shrinks the halo attention to 4 px blocks with a 1 px halo through
# model_kwargs (ByobNet overlays them on the model cfg); the rest of H0 is unchanged.
_base_ = [
    '../_base_/datasets/digits.py',
    '../_base_/schedules/digits.py',
    '../_base_/default_runtime.py',
]
model = dict(
    type='TimmClassifier',
    model_name='halonet_h0',
    num_classes=10,
    model_kwargs=dict(
        drop_path_rate=0.0,
        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=8),
    ),
)
default_hooks = dict(logger=dict(interval=10))
