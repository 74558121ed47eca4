"""mmengine integration: importing this registers the zoo's models, datasets, metrics and
compatibility fixes in mmengine's root registries (configs use ``default_scope='mmengine'``)."""
import zoo  # noqa: F401  (registers zoo models with timm)

from . import compat  # noqa: F401  (checkpoint allow-list, CPU-friendly DDP wrapper)
from .datasets import DigitsDataset, ImageFolderDataset
from .metrics import Accuracy, topk_accuracy
from .model import ClsDataPreprocessor, TimmClassifier, check_model_name

# Family-specific engine modules (detection, 3-D segmentation, ...) register themselves on import;
# they are discovered like the model families so that adding a task is adding a file.
import importlib as _importlib
import pkgutil as _pkgutil

_CORE = {"compat", "datasets", "metrics", "model", "config_check", "export", "inference"}
for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in _CORE:
        _importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["TimmClassifier", "ClsDataPreprocessor", "DigitsDataset", "ImageFolderDataset", "Accuracy",
           "topk_accuracy", "check_model_name"]
