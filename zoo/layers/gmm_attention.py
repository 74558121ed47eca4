# SPDX-License-Identifier: Apache-2.0
# Architecture from CatworldLee/Gaussian-Mixture-Mask-Attention (no licence; re-implemented from the paper); see THIRD_PARTY_NOTICES.md
"""Gaussian-mixture-masked attention (Li & Zhang, "RetNet viewed through convolution", 2023).

Per head h the scaled logits between patches p and q are multiplied (or, optionally, shifted) by

    GMM_h(p, q) = sum_k alpha[h, k] * exp(-|pos_p - pos_q|^2 / (2 * (sigma[h, k]^2 + eps)))

with eps = 1e-5 as in the reference code. The mixture is never built as an (N, N) tensor here: it
goes to ``zoo.kernels.attention`` as a ``GaussianMixture`` score mod, which computes distances from
the grid itself, so any grid size works and no distance table is stored. The op's Gaussian has
no eps, so we hand it sqrt(sigma^2 + eps), which gives exactly the reference's exponent.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models._features_fx import register_notrace_function

import zoo.kernels as _kernels

__all__ = ["GaussianMixtureMask", "GmmAttention", "gmm_dense_mask", "GMM_EPS"]

GMM_EPS = 1e-5
_MODES = ("mul", "add")


@torch.fx.wrap
@register_notrace_function
def gmm_dense_mask(alpha: torch.Tensor, sigma_eff: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The explicit (H, N, N) mixture for one grid, row-major: for inspection and tests (models pass
    the mixture to the op as a score mod and never build this tensor)."""
    gh, gw = int(grid[0]), int(grid[1])
    ys, xs = torch.meshgrid(torch.arange(gh, device=alpha.device), torch.arange(gw, device=alpha.device),
                            indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1).to(alpha.dtype)
    d2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)                       # (N, N)
    g = torch.exp(-d2[None, None] / (2 * sigma_eff.pow(2))[:, :, None, None])      # (H, K, N, N)
    return (alpha[:, :, None, None] * g).sum(1)


class GaussianMixtureMask(nn.Module):
    """The learnable mixture of one attention layer: ``alpha``, ``sigma`` of shape (heads, kernels).

    Initialised as in the reference: alpha ~ 2·N(0, 1), sigma ~ 10 + 10·N(0, 1).
    """

    def __init__(self, num_heads: int, num_kernels: int = 5, mode: str = "mul", eps: float = GMM_EPS):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"gmm_mode must be one of {_MODES}, got {mode!r}")
        if num_kernels < 1:
            raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
        self.num_heads, self.num_kernels, self.mode, self.eps = num_heads, num_kernels, mode, eps
        self.alpha = nn.Parameter(torch.empty(num_heads, num_kernels))
        self.sigma = nn.Parameter(torch.empty(num_heads, num_kernels))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.alpha.normal_(0., 2.)
            self.sigma.normal_(10., 10.)

    def effective(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sqrt(sigma^2 + eps)): the op's parameters that reproduce the reference exactly."""
        return self.alpha, torch.sqrt(self.sigma * self.sigma + self.eps)

    def score_mod(self, grid: Sequence[int], num_prefix_tokens: int = 0,
                  head_repeat: int = 1) -> _kernels.GaussianMixture:
        """The op's score mod for ``num_prefix_tokens`` leading tokens and a row-major ``grid``
        (gh, gw) of patches. ``head_repeat`` tiles the heads when several windows are folded into
        the head dimension (Swin)."""
        alpha, sigma = self.effective()
        if head_repeat > 1:
            alpha, sigma = alpha.repeat(head_repeat, 1), sigma.repeat(head_repeat, 1)
        return _kernels.GaussianMixture(alpha, sigma, grid, mode=self.mode, num_prefix_tokens=num_prefix_tokens)

    def dense(self, grid: Sequence[int]) -> torch.Tensor:
        alpha, sigma = self.effective()
        return gmm_dense_mask(alpha, sigma, grid)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernels={self.num_kernels}, mode={self.mode!r}"


class GmmAttention(nn.Module):
    """Multi-head self-attention with an optional Gaussian-mixture score mod (all in the op).

    Args:
        dim: input width. ``out_dim``: output width (default ``dim``).
        num_heads, head_dim: heads and per-head width; the inner width ``num_heads * head_dim``
            may differ from ``dim`` (SPT/lucidrains-style small-data ViTs, T2T token layers).
        num_kernels: mixture components; 0 disables the mask (the baseline model).
        gmm_mode: 'mul' (reference) or 'add'.
        num_prefix_tokens: leading tokens (cls) left unmodulated.
        scale: logit scale, default ``head_dim ** -0.5``.
        proj: add the output projection (``inner -> out_dim``).
    """

    def __init__(self, dim: int, num_heads: int = 8, head_dim: Optional[int] = None, out_dim: Optional[int] = None,
                 qkv_bias: bool = False, proj_bias: bool = True, num_kernels: int = 5, gmm_mode: str = "mul",
                 num_prefix_tokens: int = 0, scale: Optional[float] = None, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        head_dim = head_dim or dim // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (dim={dim}, num_heads={num_heads})")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.out_dim = out_dim or dim
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = float(scale) if scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * self.inner_dim, bias=qkv_bias)
        self.gmm = GaussianMixtureMask(num_heads, num_kernels, gmm_mode) if num_kernels else None
        self.proj = nn.Linear(self.inner_dim, self.out_dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = float(attn_drop)

    def attend(self, x: torch.Tensor, grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, dim) -> (attention output (B, N, inner), v (B, H, N, head_dim))."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        score_mod = self.gmm.score_mod(grid, self.num_prefix_tokens) if self.gmm is not None else None
        out = _kernels.attention(q, k, v, scale=self.scale, score_mod=score_mod,
                                 dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, N, self.inner_dim), v

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        """x (B, num_prefix_tokens + gh·gw, dim), grid (gh, gw) -> (B, N, out_dim)."""
        out, _ = self.attend(x, grid)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, prefix={self.num_prefix_tokens}"
