"""Generic mmengine glue: the classification model and its data preprocessor, datasets, samplers,
metrics, compatibility fixes, config checks, export and inference.

Importing it registers these components in the zoo's registries (scope ``'zoo'``, see
:mod:`zoo.registry`). Task-specific components (detection, 3-D segmentation, rigging, part
generation) live in :mod:`zoo.tasks`, family-specific training recipes in :mod:`zoo.recipes`; both
use only the public names exported here.
"""
from zoo._extras import requires_extra

with requires_extra("train", "zoo.engine (mmengine training and evaluation)"):
    import mmengine  # noqa: F401

import zoo  # noqa: F401  (registers zoo models with timm)

from . import compat  # noqa: F401  (checkpoint allow-list, CPU-friendly DDP wrapper)
from . import hooks  # noqa: F401  (atomic CheckpointHook, resume state, weights-fit check)
from .datasets import (Cifar10Dataset, Cifar100Dataset, ClsDataset, DigitsDataset, ImageFolderDataset, SvhnDataset,
                       TinyImageNetDataset, check_split)
from .metrics import Accuracy, topk_accuracy
from .model import ClsDataPreprocessor, TimmClassifier, build_data_preprocessor, check_model_name, gt_labels
from .samplers import RepeatAugSampler

__all__ = ["TimmClassifier", "ClsDataPreprocessor", "build_data_preprocessor", "check_model_name", "gt_labels",
           "ClsDataset", "check_split", "DigitsDataset", "ImageFolderDataset", "Cifar10Dataset", "Cifar100Dataset",
           "SvhnDataset", "TinyImageNetDataset", "RepeatAugSampler", "Accuracy", "topk_accuracy"]
