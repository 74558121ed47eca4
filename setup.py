"""Package layout for setuptools; the project metadata lives in pyproject.toml.

Two folders of the repository are installed under ``zoo`` without being sub-folders of zoo/:

- kernels/ is imported as ``zoo.kernels`` (the PyPI name ``kernels`` is taken);
- configs/ ships as package data ``zoo/configs/**.py``, so ``zoo-train CONFIG_NAME`` works from a
  wheel and ``_base_`` paths keep their relative layout.

Packages are discovered, so a new sub-package of zoo/ or kernels/ needs no edit here.
"""
from setuptools import find_namespace_packages, find_packages, setup

packages = find_packages(include=["zoo", "zoo.*"])
packages += ["zoo.kernels"] + [f"zoo.kernels.{name}" for name in find_packages("kernels")]
# every folder of configs/ (no __init__.py: they are data, shipped as their .py files)
packages += ["zoo.configs"] + [f"zoo.configs.{name}" for name in find_namespace_packages("configs", exclude=["*__pycache__*"])]

setup(
    packages=packages,
    package_dir={"zoo": "zoo", "zoo.kernels": "kernels", "zoo.configs": "configs"},
)
