"""Zoo-level views of timm's registry: which registered names belong to the zoo, by family.

Importing this module is cheap; each function imports timm and the families when first called.
"""
import difflib
from typing import List, Optional


def list_families() -> List[str]:
    """Family names (module basenames under ``zoo.models``), sorted."""
    from .models import FAMILY_MODULES
    return list(FAMILY_MODULES)


def list_models(pattern: Optional[str] = None, family: Optional[str] = None, pretrained: bool = False) -> List[str]:
    """Zoo model names (``arch`` or ``arch.tag`` when ``pretrained``), optionally filtered.

    ``pattern`` is a timm wildcard filter (``'halo*'``); ``family`` a family module name.
    """
    import timm

    families = list_families()
    if family is not None:
        if family not in families:
            raise ValueError(f"unknown family {family!r}; known families: {', '.join(families)}")
        families = [family]
    if not families:
        return []
    return timm.list_models(filter=pattern or "", module=families, pretrained=pretrained)


def model_family(name: str) -> str:
    """Family (module basename) of a zoo model name, with or without a pretrained tag."""
    from timm.models import get_arch_name
    from timm.models._registry import _model_to_module

    families = list_families()
    arch = get_arch_name(name)
    module = _model_to_module.get(arch)
    if module is None or module not in families:
        close = difflib.get_close_matches(arch, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is not a zoo model{hint}")
    return module
