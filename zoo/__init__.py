"""Attention model zoo: timm-registered vision backbones on one block-sparse attention op.

``import zoo`` registers every zoo model with timm, so ``timm.create_model(name)`` builds it.
"""
from ._catalog import list_models, model_family, list_families
from . import models  # noqa: F401  (registers every family with timm)

__version__ = "0.1.0"
__all__ = ["list_models", "model_family", "list_families", "__version__"]
