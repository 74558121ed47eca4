"""Inference-time in-place activations on buffers the caller owns.

On CPU, large fresh allocations come back as newly faulted pages, so an out-of-place GELU after a
conv or GEMM can cost several times the in-place one (FFNet, TNT profiles). These helpers run the
same kernel in place when no autograd graph is being recorded, and out of place otherwise.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.activations import GELU, GELUTanh
from timm.models._features_fx import register_notrace_function

__all__ = ["autograd_off", "gelu_approximate", "gelu_fresh"]


def autograd_off(*tensors: torch.Tensor) -> bool:
    """True when no graph is being recorded through ``tensors`` (eval under no_grad/inference_mode)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def gelu_approximate(act: nn.Module) -> Optional[str]:
    """``'none'`` / ``'tanh'`` for an exact / tanh GELU module (torch's or timm's), else None."""
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is GELU:
        return "none"
    if type(act) is GELUTanh:
        return "tanh"
    return None


def gelu_fresh(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of a buffer the caller owns (nothing else holds it): in place when autograd is off."""
    if autograd_off(x):
        return torch.ops.aten.gelu_(x, approximate=approximate)
    return F.gelu(x, approximate=approximate)


# a leaf for timm's tracers (it branches on runtime autograd state); modules that call it also
# declare `torch.fx.wrap("gelu_fresh")`, which plain torch.fx needs in the caller's globals
register_notrace_function(gelu_fresh)
