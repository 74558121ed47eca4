"""Inference-time in-place activations, norms and residual adds on buffers the caller owns.

On CPU, large fresh allocations come back as newly faulted pages, so an out-of-place GELU or
BatchNorm after a conv or GEMM can cost several times the in-place one (FFNet, TNT, HaloNet
profiles: an eval BatchNorm of a 67 MB map took 25 ms out of place, 2.3 ms in place). These helpers
run the same kernel in place when no autograd graph is being recorded, and out of place otherwise.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ConvNormAct
from timm.layers.activations import GELU, GELUTanh
from timm.models._features_fx import register_notrace_function, register_notrace_module
from torch.nn.modules import module as _module

__all__ = ["autograd_off", "gelu_approximate", "gelu_fresh", "batch_norm_fresh", "add_fresh", "norm_act_fresh",
           "residual_fresh", "FreshConvNormAct"]


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


def _in_place_ok(*tensors: torch.Tensor) -> bool:
    return autograd_off(*tensors) and not torch.compiler.is_compiling()


def _hooks_see(*producers: nn.Module) -> bool:
    """True when a forward hook may keep a module's output (then it must not be changed in place)."""
    return bool(_module._global_forward_hooks) or any(bool(m._forward_hooks) for m in producers)


def batch_norm_fresh(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Eval-mode batch norm (running statistics) of a buffer the caller owns: in place when
    autograd is off (the same kernel writing into its input), else ``F.batch_norm``."""
    affine = [t for t in (weight, bias) if t is not None]
    if _in_place_ok(x, *affine) and all(t.dtype == x.dtype for t in affine):
        unused = x.new_empty(0)          # batch statistics: not computed in eval mode
        torch.ops.aten.native_batch_norm.out(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                                             out=x, save_mean=unused, save_invstd=x.new_empty(0))
        return x
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


def add_fresh(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y``, accumulated into ``x`` when autograd is off and x is a separate buffer of the
    result's shape and dtype (bitwise the same sum, one allocation less); ``y`` is never written.
    Storage pointers are the alias test (inference_mode does not track view bases); meta tensors
    (pointer 0) and compiled graphs take the plain sum."""
    if (_in_place_ok(x, y) and x.shape == torch.broadcast_shapes(x.shape, y.shape)
            and torch.result_type(x, y) == x.dtype and x._base is None
            and x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()):
        return x.add_(y)
    return x + y


register_notrace_function(batch_norm_fresh)
register_notrace_function(add_fresh)
torch.fx.wrap("batch_norm_fresh")      # for plain torch.fx through the helpers below
torch.fx.wrap("add_fresh")


# The helpers below take the modules that produced `x` (``producers``): a forward hook on one of
# them may keep x, so x is then not changed in place.
def norm_act_fresh(norm_act: nn.Module, x: torch.Tensor, *producers: nn.Module) -> torch.Tensor:
    """A timm ``BatchNormAct2d`` in eval mode on a buffer the caller owns (norm in place, then its
    activation, which timm builds in-place); any other module or mode, or hooks on the norm (they
    would not fire otherwise) or on the producers, and the module is simply called."""
    pre_hooked = norm_act._forward_pre_hooks or _module._global_forward_pre_hooks
    if (type(norm_act) is BatchNormAct2d and not norm_act.training and norm_act.running_mean is not None
            and not pre_hooked and not _hooks_see(norm_act, *producers)):
        x = batch_norm_fresh(x, norm_act.weight, norm_act.bias, norm_act.running_mean, norm_act.running_var,
                             norm_act.eps)
        return norm_act.act(norm_act.drop(x))
    return norm_act(x)


def residual_fresh(x: torch.Tensor, shortcut: torch.Tensor, *producers: nn.Module) -> torch.Tensor:
    """``x + shortcut``, into x (a buffer the caller owns) when autograd is off and no hook saw x."""
    return x + shortcut if _hooks_see(*producers) else add_fresh(x, shortcut)


@register_notrace_module
class FreshConvNormAct(ConvNormAct):
    """timm's ``ConvNormAct`` (same parameters and outputs) whose norm+act run in place on the
    conv's own output at inference. Swap it in by class (``module.__class__ = FreshConvNormAct``):
    it adds no state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = norm_act_fresh(self.bn, self.conv(x), self.conv)
        aa = getattr(self, 'aa', None)
        return aa(x) if aa is not None else x
