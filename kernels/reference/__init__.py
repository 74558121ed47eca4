"""The PyTorch backend: the CPU training path (core.py: plans per layout, chunked, recompute in
backward; key_lists.py: listed pairs only) and the test oracle (oracle.py)."""
from .core import CHUNK_ELEMENTS, RECOMPUTE_ABOVE, reference_attention
from .oracle import dense_oracle

__all__ = ["reference_attention", "dense_oracle", "CHUNK_ELEMENTS", "RECOMPUTE_ABOVE"]
