"""The Triton backend: block-sparse flash attention on block LUTs (block_sparse.py, with the
argument bundles that layouts and modifiers fill in bundles.py) and the key-list gather kernel
(key_lists.py); shared helpers in _common.py. Kernels run on CUDA, and on CPU tensors under
TRITON_INTERPRET=1 (tests)."""
from ._common import HAS_TRITON, interpreter_enabled
from .block_sparse import TILE_OPTIONS

__all__ = ["HAS_TRITON", "interpreter_enabled", "TILE_OPTIONS"]
