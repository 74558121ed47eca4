"""Model families, one module per family. Importing this package registers them all with timm.

Modules are discovered rather than listed so that adding a family is adding a file. A family
module's basename is its family name and must not be one of timm's own module names
(timm keys ``list_models(module=...)`` on the basename).
"""
import importlib
import pkgutil

FAMILY_MODULES = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
)

for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
