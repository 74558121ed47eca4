"""Test helpers: the tensors of a (bias, score mod) pair, and the same pair on other tensors."""
import torch


def modifier_leaves(bias, score_mod):
    """The floating tensors a plain-tensor bias / Modifier bias and a score mod hold, in order."""
    out = []
    if isinstance(bias, torch.Tensor):
        out.append(bias)
    elif bias is not None:
        out += bias.tensors()
    if score_mod is not None:
        out += score_mod.tensors()
    return out


def rebuild_modifiers(bias, score_mod, ts):
    """The same bias / score mod on other tensors `ts` (e.g. autograd or float64 leaves), in the
    order of :func:`modifier_leaves`."""
    i = 0
    if isinstance(bias, torch.Tensor):
        bias, i = ts[0], 1
    elif bias is not None:
        i = len(bias.tensors())
        bias = bias.with_tensors(ts[:i])
    return bias, (score_mod.with_tensors(ts[i:i + len(score_mod.tensors())]) if score_mod is not None else None)
