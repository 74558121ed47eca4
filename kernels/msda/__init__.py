"""Multi-scale deformable attention: the op and module (op.py: reference path, backend choice,
autograd) and its Triton kernels (triton.py)."""
from .op import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_grid_sample

__all__ = ["ms_deform_attn", "MultiScaleDeformableAttention", "ms_deform_attn_grid_sample"]
