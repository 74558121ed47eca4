"""Attention model zoo: timm-registered vision backbones on one block-sparse attention op.

``import zoo`` makes every zoo model available to timm: ``import zoo, timm;
timm.create_model('biformer_tiny')`` builds it. The families are registered when timm itself is
imported (at once if it already is), so ``import zoo.kernels`` -- the attention op alone -- needs only
torch and never loads timm, mmengine or a model family.
"""
import importlib
import importlib.abc
import sys

from ._catalog import list_families, list_models, model_family

__version__ = "0.1.0"
__all__ = ["list_models", "model_family", "list_families", "__version__"]


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Meta-path finder that imports ``zoo.models`` (registering the families) once timm is loaded.

    It finds nothing itself: for ``timm`` and the zoo's own modules it asks the other finders and
    wraps the loader they return. Registration runs when timm has executed and no zoo module is
    half-imported any more (``zoo.models._builder`` imports timm while ``zoo.models`` is being imported).
    """

    def __init__(self):
        self.timm_loaded = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_then_register(module):
            try:
                exec_module(module)
            finally:
                del loader.exec_module  # the loader's own method again
            self.timm_loaded |= fullname == "timm"
            if self.timm_loaded and not _zoo_importing(besides=fullname):
                _remove_hook()
                importlib.import_module(f"{__name__}.models")

        loader.exec_module = exec_then_register
        return spec


def _zoo_importing(besides: str) -> bool:
    """Whether a zoo module other than ``besides`` is still executing its import."""
    prefix = __name__ + "."
    return any(name.startswith(prefix) and name != besides
               and getattr(getattr(mod, "__spec__", None), "_initializing", False)
               for name, mod in list(sys.modules.items()))


def _remove_hook():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTimm)]


def __getattr__(name):
    """Sub-packages on first attribute access (``zoo.models``, ``zoo.hub``, ...), as after an import."""
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "timm" in sys.modules:
    from . import models  # noqa: F401  (registers every family with timm)
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
