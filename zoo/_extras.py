"""Optional dependencies: which pip extra of attention-zoo brings which package.

The core install (``pip install attention-zoo``) is what ``import zoo`` and ``timm.create_model``
need. Everything else is imported where it is used, inside :func:`requires_extra`, so that a missing
package fails with the command that installs it::

    with requires_extra("detection"):
        from pycocotools.coco import COCO
"""
import contextlib

__all__ = ["EXTRAS", "requires_extra"]

# extra -> {import name: distribution name}; keep in step with [project.optional-dependencies]
EXTRAS = {
    "train": {"mmengine": "mmengine", "sklearn": "scikit-learn", "scipy": "scipy"},
    "detection": {"pycocotools": "pycocotools", "scipy": "scipy"},
    "medical": {"nibabel": "nibabel", "h5py": "h5py"},
    "bench": {"matplotlib": "matplotlib"},
}


@contextlib.contextmanager
def requires_extra(extra: str, feature: str = ""):
    """Turn a missing package of ``extra`` into an ImportError that names the extra to install.

    ``feature`` (optional) says what needs it, e.g. ``"COCO evaluation"``. Errors from modules that
    are installed but broken, or from packages outside the extra, pass through unchanged.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {', '.join(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRAS[extra]:
            raise
        what = f"{feature} needs" if feature else "this needs"
        raise ImportError(f"{what} {EXTRAS[extra][top]}, which is not installed; it comes with the "
                          f"{extra!r} extra: pip install 'attention-zoo[{extra}]'", name=e.name) from e
