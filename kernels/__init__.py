"""zoo.kernels: one block-sparse attention op for every family (contract: kernels/API.md).

Importing this package needs only torch; Triton is imported lazily (CUDA / interpreter tests), and
mmengine never.
"""
from .bias import GaussianMixture, IndexedBias, RelPosBias, TalkingHeads
from .layout import (CausalLayout, KeyListLayout, Layout, MaskLayout, RoutedLayout, SegmentLayout, WindowLayout,
                     causal, from_dense_mask, key_lists, routed_topk, segments, varlen, window_2d)
from .op import attention
from . import custom_op as _custom_op  # noqa: F401  registers zoo::attention_ref (torch.compile path)

import torch as _torch

if _torch.cuda.is_available():  # register the Triton ops up front so compiled graphs can call them
    from . import keylist_triton as _keylist_triton  # noqa: F401
    from . import triton_attention as _triton_attention  # noqa: F401

__all__ = [
    "attention",
    "window_2d", "routed_topk", "segments", "varlen", "causal", "from_dense_mask", "key_lists",
    "RelPosBias", "IndexedBias", "GaussianMixture", "TalkingHeads",
    "ms_deform_attn", "MultiScaleDeformableAttention",
    "Layout", "WindowLayout", "RoutedLayout", "SegmentLayout", "CausalLayout", "MaskLayout", "KeyListLayout",
]


from .msda import MultiScaleDeformableAttention, ms_deform_attn  # noqa: E402
