"""Non-classification tasks, one module each: its dataset, model wrapper, metric and inference output.

- ``detection``: COCO-style object detection (Focus-DETR).
- ``seg3d``: 3-D segmentation of NIfTI volumes (AGUNet / DAUNet).
- ``rigging``: skinning weights for articulated shapes (Puppeteer).
- ``part_generation``: part-wise latent generation with rectified flow (PartCrafter).

Importing this package registers every task in the zoo's mmengine registries; a new task is a new
module here. Optional dependencies (pycocotools, nibabel, scipy) are imported where they are used.
"""
import importlib as _importlib
import pkgutil as _pkgutil

import zoo.engine  # noqa: F401  (generic components the tasks build on)

TASK_MODULES = tuple(sorted(m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in TASK_MODULES:
    _importlib.import_module(f"{__name__}.{_name}")
