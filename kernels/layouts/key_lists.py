"""`key_lists`: per-query key lists (Sparsifiner connectivity).

Kept as lists, not as an Lq x Lk mask, so the key-list backends (kernels/reference/key_lists.py on
CPU, kernels/triton/key_lists.py on GPU) compute logits only at the listed pairs; every other
backend runs the equivalent element mask (`fallback()` -> `from_dense_mask`). Which of the two a
call takes is the router's choice (kernels/op.py).
"""
from __future__ import annotations

import torch

from .base import Layout, new_unchecked
from .mask import MaskLayout

__all__ = ["KeyListLayout", "key_lists"]


class KeyListLayout(Layout):
    """Per-query key lists (Sparsifiner connectivity): row i attends the keys listed in index[..., i, :]."""

    kind = "key_lists"

    def __init__(self, index, kv_len, dense_rows=0, validate=True):
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) \
                or index.dim() != 4:
            raise ValueError("key_lists: index must be an int64/int32 tensor (B|1, H|1, Lq, K), got "
                             f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
        if not isinstance(kv_len, int) or kv_len < 1:
            raise ValueError(f"key_lists: kv_len must be a positive int, got {kv_len!r}")
        Lq = index.shape[2]
        if not isinstance(dense_rows, int) or not 0 <= dense_rows <= Lq:
            raise ValueError(f"key_lists: dense_rows must be an int in [0, Lq={Lq}], got {dense_rows!r}")
        rows = index[:, :, dense_rows:]
        self.has_pad = False
        if validate and rows.numel() and not torch.compiler.is_compiling():
            lo, hi = int(rows.min()), int(rows.max())
            if lo < -1 or hi >= kv_len:
                raise ValueError(f"key_lists: index values must be key positions in [0, kv_len={kv_len}) or -1 "
                                 f"(unused slot), got range [{lo}, {hi}]")
            if rows.shape[-1] > 1:
                srt = rows.sort(-1).values
                if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
                    raise ValueError("key_lists: a query row lists the same key twice; each row's keys must be "
                                     "distinct (as from topk), with -1 for unused slots")
            self.has_pad = lo < 0
        elif validate:      # traced (compile): assume unused slots, which is exact either way
            self.has_pad = True
        self.index = index
        self.dense_rows = dense_rows
        self.q_len, self.kv_len = Lq, kv_len
        self.batch = index.shape[0] if index.shape[0] != 1 else None
        self.heads = index.shape[1] if index.shape[1] != 1 else None
        self.may_have_empty_rows = self.has_pad or (dense_rows < Lq and index.shape[-1] == 0)
        self._cache = {}

    def to_dense_mask(self):
        B, H, Lq, K = self.index.shape
        m = torch.zeros(B, H, Lq, self.kv_len + 1, dtype=torch.bool, device=self.index.device)
        m.scatter_(-1, torch.where(self.index >= 0, self.index, self.kv_len), True)
        m = m[..., :self.kv_len].contiguous()
        m[:, :, :self.dense_rows] = True
        return m

    def as_mask(self) -> MaskLayout:
        """The equivalent element-mask layout (built once per layout)."""
        if "_mask" not in self.__dict__:
            self._mask = MaskLayout(self.to_dense_mask())
        return self._mask

    # -- lowerings ----------------------------------------------------------------------------------
    def fallback(self):
        return self.as_mask()

    def key_list_args(self):
        """(index (B|1, H|1, Lq, K), kv_len, dense_rows, has_pad) for the key-list backends."""
        return self.index, self.kv_len, self.dense_rows, self.has_pad

    def flatten(self):
        return [self.index], [self.kv_len, self.dense_rows, int(self.has_pad)]

    @classmethod
    def unflatten(cls, tensors, ints):
        kv_len, d, has_pad = ints
        index = tensors[0]
        return new_unchecked(cls, index=index, kv_len=kv_len, dense_rows=d, has_pad=bool(has_pad),
                             q_len=index.shape[2], batch=None, heads=None, may_have_empty_rows=bool(has_pad),
                             _cache={})

    def __repr__(self):
        return (f"KeyListLayout(q_len={self.q_len}, kv_len={self.kv_len}, keys_per_row={self.index.shape[-1]}, "
                f"dense_rows={self.dense_rows})")


def key_lists(index: torch.Tensor, kv_len: int, *, dense_rows: int = 0, validate: bool = True
              ) -> KeyListLayout:
    """Query i attends keys index[b, h, i, :] (B|1, H|1, Lq, K); -1 marks an unused slot.

    The first `dense_rows` query rows attend every key (their index rows are ignored), e.g. the cls
    row of Sparsifiner. Keys in a row must be distinct. `validate=False` skips the range and
    uniqueness checks for callers that guarantee distinct keys in [0, kv_len) and no -1 (top-k
    indices): the checks cost about as much as the sparse attention itself.
    """
    return KeyListLayout(index, kv_len, dense_rows=dense_rows, validate=validate)

