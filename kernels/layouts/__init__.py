"""Attention layouts: which keys each query may attend. One module per layout (see base.py for
the lowering protocol every layout implements)."""
from .base import Layout
from .causal import CausalLayout, causal
from .key_lists import KeyListLayout, key_lists
from .mask import MaskLayout, from_dense_mask
from .routed import RoutedLayout, routed_topk
from .segments import SegmentLayout, segments, varlen
from .sliding import SlidingWindowLayout, sliding_window
from .window import WindowLayout, window_2d

__all__ = [
    "Layout", "WindowLayout", "RoutedLayout", "SegmentLayout", "CausalLayout", "MaskLayout", "KeyListLayout",
    "SlidingWindowLayout",
    "window_2d", "routed_topk", "segments", "varlen", "causal", "from_dense_mask", "key_lists", "sliding_window",
]
