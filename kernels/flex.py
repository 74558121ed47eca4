"""backend="flex": compiled PyTorch FlexAttention, CUDA only, for comparison.

The layout lowers itself to a mask_mod over natural token indices (`Layout.flex_lowering`; a
zero-border window also pads K/V with its virtual keys, as the dense oracle does) and each
modifier to a score_mod over captured tensors (`Modifier.flex_score_mod`).
"""
import torch

from .layouts.base import unsupported

__all__ = ["can_run", "run"]

NAME = "flex"
_COMPILED = {}


def _flex():
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def can_run(q, k, v, layout, mods, dropout_p):
    if q.device.type != "cuda":
        return False, f"backend='flex' needs CUDA tensors (got {q.device}); use backend='reference' on CPU"
    if q.dtype == torch.float64:
        return False, "backend='flex' supports float32/float16/bfloat16"
    why = unsupported("flex", "FlexAttention", layout, mods, dropout_p)
    return not why, why


def run(q, k, v, layout, scale, mods, return_lse, dropout):
    from torch.nn.attention.flex_attention import create_block_mask
    B, H, Lq, _ = q.shape
    geo = dict(k=k, v=v, mask_mod=None, nat=lambda ki: ki, local=None)
    if layout is not None:
        geo = layout.flex_lowering(q, k, v)
    k, v, mask_mod = geo["k"], geo["v"], geo["mask_mod"]
    fns = [m.flex_score_mod(geo) for m in mods]

    def score_fn(score, b, h, qi, ki):
        for f in fns:
            score = f(score, b, h, qi, ki)
        return score

    block_mask = None
    if mask_mod is not None:
        bm_b = B if getattr(layout, "batch", None) not in (None, 1) else 1
        bm_h = H if getattr(layout, "heads", None) not in (None, 1) else 1
        if bm_b == 1 and bm_b != B:
            inner = mask_mod
            mask_mod = lambda b, h, qi, ki: inner(b * 0, h, qi, ki)  # noqa: E731
        block_mask = create_block_mask(mask_mod, bm_b, bm_h, Lq, k.shape[2], device=q.device, _compile=True)
    return _flex()(q, k, v, score_mod=score_fn if fns else None, block_mask=block_mask, scale=scale,
                   return_lse=True)
