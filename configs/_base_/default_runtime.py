# Runtime shared by every config: registries, hooks, logging, environment.
default_scope = 'zoo'  # the zoo's registries first (zoo.registry), then mmengine's
custom_imports = dict(imports=['zoo.engine'], allow_failed_imports=False)

default_hooks = dict(
    runtime_info=dict(type='RuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # the zoo's CheckpointHook (zoo/engine/hooks.py: atomic writes, removals after the successor exists);
    # keeps the last 2 epoch checkpoints plus the best one by val top-1
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2, save_best='accuracy/top1', rule='greater'),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # nccl on GPUs; tools/train.py switches to gloo when CUDA is unavailable
    dist_cfg=dict(backend='nccl'),
)

log_processor = dict(by_epoch=True, window_size=10)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
