"""The zoo's mmengine registries: children of mmengine's root registries under the scope ``'zoo'``.

Configs set ``default_scope = 'zoo'``, so ``type='TimmClassifier'`` resolves here first and then in
mmengine's root (optimizers, schedulers, runners, generic hooks). Components of other OpenMMLab
codebases with the same class names (mmpretrain's ``TimmClassifier``, ``Accuracy``, ...) live in
their own scopes and never collide with ours. mmengine imports this module by name when it switches
to the ``'zoo'`` scope; ``locations`` are imported the first time a zoo registry is searched.
"""
from zoo._extras import requires_extra

with requires_extra("train", "zoo.registry (the zoo's mmengine registries)"):
    import mmengine  # noqa: F401

from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

__all__ = ["MODELS", "DATASETS", "METRICS", "DATA_SAMPLERS", "MODEL_WRAPPERS", "HOOKS"]

_LOCATIONS = ["zoo.engine", "zoo.tasks", "zoo.recipes"]

MODELS = Registry("model", parent=MMENGINE_MODELS, scope="zoo", locations=_LOCATIONS)
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope="zoo", locations=_LOCATIONS)
DATA_SAMPLERS = Registry("data sampler", parent=MMENGINE_DATA_SAMPLERS, scope="zoo", locations=_LOCATIONS)
METRICS = Registry("metric", parent=MMENGINE_METRICS, scope="zoo", locations=_LOCATIONS)
MODEL_WRAPPERS = Registry("model_wrapper", parent=MMENGINE_MODEL_WRAPPERS, scope="zoo", locations=_LOCATIONS)
HOOKS = Registry("hook", parent=MMENGINE_HOOKS, scope="zoo", locations=_LOCATIONS)
