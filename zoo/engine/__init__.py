"""mmengine integration: importing this registers the zoo's models, datasets, metrics and
compatibility fixes in mmengine's root registries (configs use ``default_scope='mmengine'``)."""
import zoo  # noqa: F401  (registers zoo models with timm)

from . import compat  # noqa: F401  (checkpoint allow-list, CPU-friendly DDP wrapper)
from .datasets import DigitsDataset, ImageFolderDataset
from .metrics import Accuracy, topk_accuracy
from .model import ClsDataPreprocessor, TimmClassifier, check_model_name

__all__ = ["TimmClassifier", "ClsDataPreprocessor", "DigitsDataset", "ImageFolderDataset", "Accuracy",
           "topk_accuracy", "check_model_name"]
