# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from lim142857/Sparsifiner (MIT; Copyright (c) 2023 Cong Wei); see THIRD_PARTY_NOTICES.md
"""Sparsifiner's connectivity predictor: a cheap low-rank guess of each query's attention row,
turned into instance-dependent top-k key lists for the real attention.

Wei et al., "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers", CVPR 2023 (arXiv 2303.13755); upstream lim142857/Sparsifiner.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models._features_fx import register_notrace_function, register_notrace_module

from zoo.kernels import KeyListLayout, key_lists

__all__ = ["ConnectivityPredictor", "topk_connectivity", "resample_token_proj", "keep_count"]


def keep_count(keep_rate: float, num_keys: int) -> int:
    """Keys kept per query row: ceil(keep_rate * N), at least 1 and at most N."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return max(1, min(num_keys, math.ceil(keep_rate * num_keys)))


@register_notrace_function
def resample_token_proj(w: torch.Tensor, num_tokens: int, num_prefix_tokens: int,
                        old_grid: Tuple[int, int], new_grid: Optional[Tuple[int, int]] = None,
                        rescale: bool = False) -> torch.Tensor:
    """Resample a per-token projection (N0, n) to `num_tokens` rows.

    Rows are tokens: the prefix rows stay, the patch rows are a 2-D map resampled bilinearly like
    a position embedding (1-D along the token axis when no grid fits). With `rescale`, patch rows
    are scaled by old/new patch count so that a token *sum* through them keeps its magnitude.
    """
    if w.shape[0] == num_tokens:
        return w
    n_old = w.shape[0] - num_prefix_tokens
    n_new = num_tokens - num_prefix_tokens
    if n_new <= 0:
        raise ValueError(f"connectivity predictor needs at least one patch token, got {num_tokens} tokens "
                         f"with {num_prefix_tokens} prefix tokens")
    if new_grid is None:
        g = int(round(math.sqrt(n_new)))
        new_grid = (g, g) if g * g == n_new else None
    if new_grid is not None and old_grid[0] * old_grid[1] == n_old:
        out = resample_abs_pos_embed(w[None], new_size=list(new_grid), old_size=list(old_grid),
                                     num_prefix_tokens=num_prefix_tokens, interpolation="bilinear",
                                     antialias=False)[0]
    else:
        patch = F.interpolate(w[None, num_prefix_tokens:].transpose(1, 2), size=n_new, mode="linear",
                              align_corners=False).transpose(1, 2)[0]
        out = torch.cat([w[:num_prefix_tokens], patch], 0)
    if rescale:
        scale = torch.ones(num_tokens, 1, dtype=w.dtype, device=w.device)
        scale[num_prefix_tokens:] = n_old / n_new
        out = out * scale
    return out


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
                   torch.float64: torch.int64}


def _nonnegative_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Unsorted top-k indices along the last dim of x >= 0, selected on x's bit patterns read as
    same-width integers: for non-negative floats the integer order is the float order, and the
    CPU compares integers faster (no NaN handling)."""
    itype = _SAME_WIDTH_INT.get(x.dtype)
    return (x if itype is None else x.view(itype)).topk(k, dim=-1, sorted=False).indices


@register_notrace_function
def topk_connectivity(approx_attn: torch.Tensor, keep_rate: float, num_prefix_tokens: int = 1,
                      none_if_dense: bool = False, nonnegative: bool = False) -> Optional[KeyListLayout]:
    """approx_attn (B, H, N - P, N) -> `zoo.kernels.key_lists` layout over N tokens, detached.

    Each non-prefix query keeps its ceil(keep_rate * N) highest-scoring keys; prefix (cls) query
    rows stay dense because the classifier reads them. Key lists rather than a mask, so the
    attention computes only the kept pairs (`.to_dense_mask()` gives the mask). With
    `none_if_dense`, a selection that keeps every key is returned as None (dense attention).

    `nonnegative`: the caller guarantees approx_attn >= 0 (the predictor's coef @ |basis|). The
    top-k then runs on the scores' bit patterns read as integers, which order exactly like
    non-negative floats and compare faster (CPU top-k: 6.8 vs 10.5 ms on (8, 6, 196, 197)).
    """
    B, H, M, N = approx_attn.shape
    k = keep_count(keep_rate, N)
    if none_if_dense and k >= N:
        return None
    scores = approx_attn.detach()
    idx = _nonnegative_topk_indices(scores, k) if nonnegative else scores.topk(k, dim=-1, sorted=False).indices
    idx = torch.cat([idx.new_zeros(B, H, N - M, k), idx], dim=2)     # prefix rows: dense, entries unused
    return key_lists(idx, N, dense_rows=N - M, validate=False)


@register_notrace_module     # data-dependent top-k and size-dependent resampling: a leaf for torch.fx
class ConnectivityPredictor(nn.Module):
    """Low-rank attention approximation from the layer's own q, k (upstream `MaskPredictor`).

    q, k (B, H, N, D) -> channel down-projection D -> D/`reduce_c_factor` (shared by the heads),
    keys projected along tokens N -> n = N0 // `reduce_n_factor` with `proj_n`; coefficients =
    softmax(q' k_low * H^-0.5) over the n basis rows (prefix query rows dropped), sparsified to the
    top `coef_topk`; basis = |proj_back_n|^T thresholded at `basis_threshold`; approx = coef @ basis.

    `recon=True` is the predictor-training form (phase 1 of the recipe): full coefficients and the
    raw, signed basis, so every weight gets a gradient from the reconstruction loss.

    `rank` fixes n directly (default: built token count // reduce_n_factor).
    Token projections are built for `num_tokens` (prefix + grid); other token counts resample
    them (bilinear over the grid, see `resample_token_proj`), so the model runs at any size.
    Param names follow upstream (`proj_c_q`, `proj_c_k`, `proj_n`, `proj_back_n`).
    """

    def __init__(self, head_dim: int, num_heads: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 1,
                 reduce_c_factor: int = 2, reduce_n_factor: int = 6, basis_threshold: float = 0.02,
                 coef_topk: int = 8, rank: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.reduced_c = max(1, head_dim // reduce_c_factor)
        self.reduced_n = int(rank) if rank else max(1, self.num_tokens // reduce_n_factor)
        self.scale = num_heads ** -0.5          # upstream scales by the head count, not head_dim
        self.basis_threshold = basis_threshold
        self.coef_topk = coef_topk
        self.proj_c_q = nn.Linear(head_dim, self.reduced_c, **dd)
        self.proj_c_k = nn.Linear(head_dim, self.reduced_c, **dd)
        self.proj_n = nn.Parameter(torch.zeros(self.num_tokens, self.reduced_n, **dd))
        self.proj_back_n = nn.Parameter(torch.zeros(self.num_tokens, self.reduced_n, **dd))
        self.reset_parameters()

    def reset_parameters(self):
        trunc_normal_(self.proj_n, std=0.02)
        trunc_normal_(self.proj_back_n, std=0.02)

    def token_projections(self, num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        p = self.num_prefix_tokens
        down = resample_token_proj(self.proj_n, num_tokens, p, self.grid_size, rescale=True)
        up = resample_token_proj(self.proj_back_n, num_tokens, p, self.grid_size)
        return down, up

    def forward(self, q: torch.Tensor, k: torch.Tensor, recon: bool = False, token_pos: Optional[torch.Tensor] = None,
                num_patches: Optional[int] = None) -> torch.Tensor:
        """q, k (B, H, N, D) -> approx attention (B, H, N - P, N) over all N keys; non-negative
        (softmax coefficients times |basis|) except in the `recon` form.

        After token pruning, `token_pos` (B, N - P) gives the kept patch tokens' positions among
        the `num_patches` of the unpruned sequence: each token keeps its own rows of the token
        projections (upstream zeroes pruned tokens instead, which gives the same sums).
        """
        P = self.num_prefix_tokens
        if token_pos is None:
            down, up = self.token_projections(q.shape[2])          # (N, n)
        else:
            down, up = self.token_projections(P + num_patches)
            prefix = torch.arange(P, device=token_pos.device).expand(token_pos.shape[0], P)
            rows = torch.cat([prefix, token_pos + P], dim=1)        # (B, N)
            down, up = down[rows][:, None], up[rows][:, None]       # (B, 1, N, n)
        qc = self.proj_c_q(q)                                     # (B, H, N, c)
        kc = self.proj_c_k(k)
        k_low = kc.transpose(-1, -2) @ down                       # (B, H, c, n)
        logits = (qc[:, :, P:] @ k_low) * self.scale
        # A softmax over the n low-rank basis coefficients, not attention over tokens: it mixes
        # basis rows, so it stays here rather than going through zoo.kernels.attention.
        coef = logits.softmax(dim=-1)                             # (B, H, N - P, n)
        if recon:
            return coef @ up.transpose(-1, -2)
        basis = up.abs().transpose(-1, -2)
        basis = basis.masked_fill(basis <= self.basis_threshold, 0.0)
        k = self.coef_topk
        if not 0 < k < coef.shape[-1]:
            return coef @ basis
        idx = _nonnegative_topk_indices(coef.detach(), k)                       # softmax output: >= 0
        val = coef.gather(-1, idx)
        if basis.dim() == 2:         # one basis for all rows: a weighted sum of k basis rows per query
            # one dtype for both (under autocast the coefficients come out in the lower precision)
            return F.embedding_bag(idx.reshape(-1, k), basis.to(val.dtype), mode="sum",
                                   per_sample_weights=val.reshape(-1, k)).view(*coef.shape[:-1], basis.shape[-1])
        return torch.zeros_like(coef).scatter_(-1, idx, val) @ basis      # per-sample basis (token pruning)

    def extra_repr(self) -> str:
        return (f"tokens={self.num_tokens}, grid={self.grid_size}, rank={self.reduced_n}, "
                f"channels={self.reduced_c}, coef_topk={self.coef_topk}, basis_threshold={self.basis_threshold}")
