"""zoo.kernels: one block-sparse attention op for every family (contract: kernels/API.md).

Importing this package needs only torch; Triton is imported lazily (CUDA / interpreter tests), and
neither timm, mmengine nor any model.
"""
from .bias import GaussianMixture, IndexedBias, RelPosBias, TalkingHeads
from .layouts import (CausalLayout, KeyListLayout, Layout, MaskLayout, RoutedLayout, SegmentLayout,
                      SlidingWindowLayout, WindowLayout, causal, from_dense_mask, key_lists, routed_topk, segments,
                      sliding_window, varlen, window_2d)
from .op import attention
from . import custom_op as _custom_op  # noqa: F401  registers zoo::attention_ref (torch.compile path)

import torch as _torch

if _torch.cuda.is_available():  # register the Triton ops up front so compiled graphs can call them
    from .triton import block_sparse as _block_sparse, key_lists as _key_lists  # noqa: F401

from .msda import MultiScaleDeformableAttention, ms_deform_attn  # noqa: E402

__all__ = [
    "attention",
    "window_2d", "routed_topk", "segments", "varlen", "causal", "from_dense_mask", "key_lists", "sliding_window",
    "RelPosBias", "IndexedBias", "GaussianMixture", "TalkingHeads",
    "ms_deform_attn", "MultiScaleDeformableAttention",
    "Layout", "WindowLayout", "RoutedLayout", "SegmentLayout", "CausalLayout", "MaskLayout", "KeyListLayout",
    "SlidingWindowLayout",
]
