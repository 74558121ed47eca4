"""Gaussian-mixture-masked attention on five small-dataset ViT hosts (ViT, Swin, CaiT, PiT, T2T).

"Toward a Deeper Understanding: RetNet Viewed through Convolution" (Li & Zhang, arXiv 2309.05375):
each attention layer multiplies its scaled logits by a per-head mixture of K isotropic Gaussians of
the 2-D patch offset, ``sum_k alpha[h,k] exp(-|dp|^2 / 2(sigma[h,k]^2 + 1e-5))``, learned end to end
(see zoo/layers/gmm_attention.py). The hosts are the reference's CIFAR / Tiny-ImageNet configs
(lucidrains-style small-data ViTs), each registered with and without the mixture:

=========  =============================  ==========================  ==========================
host       GMM / baseline (32 px)         GMM / baseline (64 px)      where the mixture acts
=========  =============================  ==========================  ==========================
ViT        gmm_vit_tiny_p4_32             gmm_vit_tiny_p8_64          every layer; GMM models
           vit_tiny_p4_32_gmmbase         vit_tiny_p8_64_gmmbase      drop the cls token
Swin       gmm_swin_tiny_p2_32 / ...      gmm_swin_tiny_p4_64         window tokens, before the
                                                                      shifted-window mask
CaiT       gmm_cait_tiny_p4_32 / ...      gmm_cait_tiny_p8_64         patch self-attention only,
                                                                      before talking heads
PiT        gmm_pit_tiny_p2_32 / ...       gmm_pit_tiny_p4_64          patch-patch block (cls
                                                                      token unmodulated)
T2T        gmm_t2t_vit_32 / ...           gmm_t2t_vit_64              T2T token layers and the
                                                                      main encoder
=========  =============================  ==========================  ==========================

Every attention runs in ``zoo.kernels.attention``. The mixture is a ``GaussianMixture`` score mod
(no (N, N) tensor, grid from the actual input); CaiT's talking heads are the op's ``head_mix``
(``TalkingHeads``: logits mixed across heads before the softmax, probabilities after it).

No weights were released upstream; ``checkpoint_filter_fn`` maps state dicts of the reference
code (CatworldLee/Gaussian-Mixture-Mask-Attention) onto these modules and drops its per-layer
copies of the fixed distance table.
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module
from timm.models._manipulate import checkpoint, checkpoint_seq

import zoo.kernels as _kernels
from zoo import hub
from zoo.layers.gmm_attention import GaussianMixtureMask, GmmAttention, gmm_kernel_attention

__all__ = ["GmmViT", "GmmSwin", "GmmCaiT", "GmmPiT", "GmmT2T", "checkpoint_filter_fn"]

_POOLS = ("", "avg", "token")


def _check_pool(global_pool: str, allowed: Sequence[str] = _POOLS) -> str:
    if global_pool not in allowed:
        raise ValueError(f"global_pool must be one of {tuple(allowed)}, got {global_pool!r}")
    return global_pool


def _xavier_init(m: nn.Module):
    """The reference's init for its lucidrains-style hosts (ViT, CaiT, PiT)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _trunc_init(m: nn.Module):
    """The reference's init for its Swin / T2T hosts."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _linear_rates(rate: float, n: int) -> List[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` (plain floats: works on the meta device)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


@torch.fx.wrap
@register_notrace_function
def _check_img(x: torch.Tensor, in_chans: int, multiple: int) -> None:
    """A clear error for inputs the host cannot tokenise (a torch.fx leaf: it branches on shapes)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ValueError(f"input size {x.shape[-2]}x{x.shape[-1]} must be a multiple of the patch size {multiple}")


@torch.fx.wrap
@register_notrace_function
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, num_prefix_tokens: int,
                  base_grid: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """x (B, prefix + gh·gw, C) + the learned table, resampled when the grid differs from training."""
    gh, gw = int(grid[0]), int(grid[1])
    if (gh, gw) != tuple(base_grid):
        pos_embed = resample_abs_pos_embed(pos_embed, (gh, gw), old_size=base_grid,
                                           num_prefix_tokens=num_prefix_tokens)
    return x + pos_embed


def _tokens_to_nchw(x: torch.Tensor, num_prefix_tokens: int, grid) -> torch.Tensor:
    return x[:, num_prefix_tokens:].reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> NHWC tokens. A conv is the reference's rearrange + Linear with the
    weight reshaped (see checkpoint_filter_fn)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FeedForward(Mlp):
    """timm's Mlp (fc1 -> GELU -> fc2) named for the hosts."""


# ----------------------------------------------------------------------------------------------
# ViT and PiT (pre-norm transformer blocks over a grid, optional cls token)

class Block(nn.Module):
    """Pre-norm block: x + attn(LN x), x + mlp(LN x)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, num_kernels: int = 5,
                 gmm_mode: str = "mul", num_prefix_tokens: int = 0, qkv_bias: bool = False,
                 proj_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GmmAttention(dim, num_heads, head_dim, qkv_bias=qkv_bias, num_kernels=num_kernels,
                                 gmm_mode=gmm_mode, num_prefix_tokens=num_prefix_tokens, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class _TokenModel(nn.Module):
    """Shared timm plumbing for the token-sequence hosts (ViT, CaiT, T2T): forward_features returns
    (B, prefix + N, C) tokens as timm's vision_transformer does; intermediates come out NCHW."""

    num_prefix_tokens: int = 0

    def _init_head(self, num_classes: int, global_pool: str, drop_rate: float, fc_norm: bool):
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc_norm = nn.LayerNorm(self.num_features) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._valid_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _valid_pool(self, global_pool: str) -> str:
        allowed = _POOLS if self.num_prefix_tokens else ("", "avg")
        return _check_pool(global_pool, allowed)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class GmmViT(_TokenModel):
    """The reference's small-data ViT: conv patch embed, pre-norm blocks with inner width
    heads·head_dim, LN -> Linear head. With the mixture on there is no cls token and the head
    mean-pools (the reference's choice, kept: it is part of what its GMM numbers measure)."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 100,
                 global_pool: Optional[str] = None, embed_dim: int = 192, depth: int = 9, num_heads: int = 12,
                 head_dim: int = 16, mlp_ratio: float = 2., num_kernels: int = 5, gmm_mode: str = "mul",
                 class_token: Optional[bool] = None, drop_rate: float = 0., proj_drop_rate: float = 0.,
                 pos_drop_rate: float = 0., drop_path_rate: float = 0.):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        class_token = num_kernels == 0 if class_token is None else class_token
        self.num_prefix_tokens = 1 if class_token else 0
        global_pool = self._valid_pool(global_pool if global_pool is not None else ("token" if class_token else "avg"))
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.base_grid = (img_size // patch_size,) * 2
        n = self.base_grid[0] * self.base_grid[1]
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, head_dim, int(embed_dim * mlp_ratio), num_kernels, gmm_mode,
                  self.num_prefix_tokens, proj_drop=proj_drop_rate, drop_path=drop_path_rate)
            for _ in range(depth)])  # the reference uses one drop-path rate for every block
        self.norm = nn.Identity()  # the reference normalises only the pooled vector (fc_norm)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self._init_head(num_classes, global_pool, drop_rate, fc_norm=True)
        self.apply(_xavier_init)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^fc_norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        _check_img(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        grid = x.shape[1:3]
        x = x.flatten(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = add_pos_embed(x, self.pos_embed, self.num_prefix_tokens, self.base_grid, grid)
        return self.pos_drop(x), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = checkpoint(blk, x, grid) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x, grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        inter = []
        for i, blk in enumerate(blocks):
            x = blk(x, grid)
            if i in take:
                y = self.norm(x) if norm else x
                inter.append(_tokens_to_nchw(y, self.num_prefix_tokens, grid) if output_fmt == "NCHW"
                             else y[:, self.num_prefix_tokens:])
        if intermediates_only:
            return inter
        return self.norm(x), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


class PoolStage(nn.Module):
    """PiT's pooling: depthwise 3x3 stride-2 conv (channel x2) + pointwise conv for patch tokens,
    a Linear for the cls token."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, out_dim, 3, 2, 1, groups=dim)
        self.pw = nn.Conv2d(out_dim, out_dim, 1)
        self.cls_fc = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, grid):
        cls, tok = x[:, :1], x[:, 1:]
        tok = tok.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])
        tok = self.pw(self.dw(tok))
        new_grid = tok.shape[-2:]
        return torch.cat([self.cls_fc(cls), tok.flatten(2).transpose(1, 2)], dim=1), new_grid


class PitStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, head_dim: int, mlp_ratio: float,
                 num_kernels: int, gmm_mode: str, downsample: bool, proj_drop: float, drop_path: float):
        super().__init__()
        self.pool = PoolStage(dim, out_dim) if downsample else None
        self.blocks = nn.ModuleList([
            Block(out_dim, num_heads, head_dim, int(out_dim * mlp_ratio), num_kernels, gmm_mode, 1,
                  proj_drop=proj_drop, drop_path=drop_path) for _ in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid):
        if self.pool is not None:
            x, grid = self.pool(x, grid)
        for blk in self.blocks:
            x = checkpoint(blk, x, grid) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x, grid)
        return x, grid


class GmmPiT(nn.Module):
    """The reference's small-data PiT: conv patch embed, cls token, three stages joined by
    depthwise-conv pooling; the mixture acts on the patch-patch block of every layer.

    forward_features returns (B, 1 + N, C) tokens (cls first), as timm's PiT does with its cls token.
    """

    num_prefix_tokens = 1

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 3, num_classes: int = 100,
                 global_pool: str = "token", embed_dim: int = 96, depths: Sequence[int] = (2, 6, 4),
                 num_heads: Sequence[int] = (2, 4, 8), head_dim: Optional[int] = None, mlp_ratio: float = 2.,
                 num_kernels: int = 5, gmm_mode: str = "mul", drop_rate: float = 0., proj_drop_rate: float = 0.,
                 pos_drop_rate: float = 0., drop_path_rate: float = 0.):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        head_dim = head_dim or embed_dim // num_heads[0]  # the reference keeps stage 1's head width throughout
        self.num_classes, self.in_chans = num_classes, in_chans
        self.global_pool = _check_pool(global_pool)
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.base_grid = (img_size // patch_size,) * 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.base_grid[0] ** 2 + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        stages, dim, self.feature_info = [], embed_dim, []
        for i, (d, h) in enumerate(zip(depths, num_heads)):
            out_dim = embed_dim * 2 ** i
            stages.append(PitStage(dim, out_dim, d, h, head_dim, mlp_ratio, num_kernels, gmm_mode, i > 0,
                                   proj_drop_rate, drop_path_rate))
            self.feature_info.append(dict(num_chs=out_dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
            dim = out_dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_xavier_init)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^stages\.(\d+)", None) if coarse else (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                            (r"^stages\.(\d+)\.pool", (0,)), (r"^fc_norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor):
        _check_img(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        grid = x.shape[1:3]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        return self.pos_drop(add_pos_embed(x, self.pos_embed, 1, self.base_grid, grid)), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        for stage in self.stages:
            x, grid = stage(x, grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        x, grid = self._embed(x)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        inter = []
        for i, stage in enumerate(stages):
            x, grid = stage(x, grid)
            if i in take:
                inter.append(_tokens_to_nchw(x, 1, grid))
        if intermediates_only:
            return inter
        return self.norm(x), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# CaiT (talking-heads patch attention + class attention)

@torch.fx.wrap
@register_notrace_function
def talking_heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            mix_pre: torch.Tensor, mix_post: torch.Tensor, alpha: Optional[torch.Tensor] = None,
                            sigma: Optional[torch.Tensor] = None, grid=(0, 0), gmm_mode: str = "mul") -> torch.Tensor:
    """Talking-heads attention, all in zoo.kernels.attention (`head_mix`, and the mixture as a score mod):

    logits_g = sum_h mix_pre[h, g] · (scale q_h k_h^T ⊙ gmm_h)   (``gmm_mode='add'``: + gmm_h);
    A_g = softmax(logits_g); out_g = (sum_h mix_post[h, g] · A_h) v_g.
    """
    sm = None
    if alpha is not None:
        sm = _kernels.GaussianMixture(alpha, sigma, (int(grid[0]), int(grid[1])), mode=gmm_mode)
    return _kernels.attention(q, k, v, scale=scale, score_mod=sm,
                              head_mix=_kernels.TalkingHeads(mix_pre, mix_post))


class TalkingHeadsAttention(nn.Module):
    """CaiT attention with talking heads; the mixture only in patch self-attention (the reference's
    choice). Keys/values come from ``context`` when given (class attention: cls query, patch keys)."""

    def __init__(self, dim: int, num_heads: int = 4, head_dim: int = 64, num_kernels: int = 0, gmm_mode: str = "mul",
                 proj_drop: float = 0.):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)
        self.mix_pre = nn.Parameter(torch.randn(num_heads, num_heads))
        self.mix_post = nn.Parameter(torch.randn(num_heads, num_heads))
        self.gmm = GaussianMixtureMask(num_heads, num_kernels, gmm_mode) if num_kernels else None
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid=None, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, Lq, _ = x.shape
        ctx = x if context is None else context
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(ctx).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        alpha = sigma = None
        mode = "mul"
        if self.gmm is not None:
            (alpha, sigma), mode = self.gmm.effective(), self.gmm.mode
        out = talking_heads_attention(q, k, v, self.scale, self.mix_pre, self.mix_post, alpha, sigma, grid, mode)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Lq, -1)))


def _layer_scale_init(index: int) -> float:
    """The reference's per-layer LayerScale init from the 1-based layer index (CaiT paper §2)."""
    return 0.1 if index <= 18 else (1e-5 if index <= 24 else 1e-6)


class CaitBlock(nn.Module):
    """LayerScale pre-norm block. Class-attention blocks take the patch tokens as raw (un-normalised)
    context, as the reference does."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, index: int, num_kernels: int = 0,
                 gmm_mode: str = "mul", proj_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        init = _layer_scale_init(index)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TalkingHeadsAttention(dim, num_heads, head_dim, num_kernels, gmm_mode, proj_drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden, drop=proj_drop)
        self.gamma_2 = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor, grid, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), grid, context))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class GmmCaiT(_TokenModel):
    """The reference's small-data CaiT (``cait-tiny``: dim 108, 24 patch + 2 class layers, 4 heads of
    64, MLP 384). forward_features returns (B, 1 + N, C): the cls token after class attention, then
    the patch tokens."""

    num_prefix_tokens = 1

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 100,
                 global_pool: str = "token", embed_dim: int = 108, depth: int = 24, depth_token_only: int = 2,
                 num_heads: int = 4, head_dim: int = 64, mlp_hidden: int = 384, num_kernels: int = 5,
                 gmm_mode: str = "mul", drop_rate: float = 0., proj_drop_rate: float = 0., pos_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.base_grid = (img_size // patch_size,) * 2
        self.pos_embed = nn.Parameter(torch.randn(1, self.base_grid[0] * self.base_grid[1], embed_dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(*[
            CaitBlock(embed_dim, num_heads, head_dim, mlp_hidden, i + 1, num_kernels, gmm_mode, proj_drop_rate,
                      drop_path_rate) for i in range(depth)])
        self.blocks_token_only = nn.ModuleList([
            CaitBlock(embed_dim, num_heads, head_dim, mlp_hidden, i + 1, 0, gmm_mode, proj_drop_rate, drop_path_rate)
            for i in range(depth_token_only)])
        self.norm = nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self._init_head(num_classes, self._valid_pool(global_pool), drop_rate, fc_norm=True)
        self.apply(_xavier_init)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^blocks_token_only\.(\d+)", None), (r"^fc_norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        _check_img(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        grid = x.shape[1:3]
        x = add_pos_embed(x.flatten(1, 2), self.pos_embed, 0, self.base_grid, grid)
        return self.pos_drop(x), grid

    def _class_attention(self, x: torch.Tensor, grid) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls = blk(cls, grid, x)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = checkpoint(blk, x, grid) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x, grid)
        return self.norm(self._class_attention(x, grid))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        inter = []
        for i, blk in enumerate(blocks):
            x = blk(x, grid)
            if i in take:
                inter.append(_tokens_to_nchw(x, 0, grid) if output_fmt == "NCHW" else x)
        if intermediates_only:
            return inter
        return self.norm(self._class_attention(x, grid)), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.blocks_token_only = nn.ModuleList()
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


# ----------------------------------------------------------------------------------------------
# Swin

@register_notrace_function
def shift_window_mask(H: int, W: int, window: int, shift: int, device) -> torch.Tensor:
    """(nW, N, N) additive mask of the shifted windows, -100 across regions (the reference's value)."""
    img = torch.zeros(1, H, W, 1, device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = _window_partition(img, window).reshape(-1, window * window)
    m = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(m).masked_fill(m != 0, -100.0)


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, window, window, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C)


def _window_reverse(w: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    C = w.shape[-1]
    x = w.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def _rel_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


@register_notrace_module
class ShiftedWindowAttention(nn.Module):
    """(Shifted-)window attention on an NHWC map with Swin's relative position bias.

    The windows of one image are folded into the head dimension so that the shift mask, which
    differs per window, and the per-head position bias become one (1, nW·H, N, N) bias for the op;
    the mixture (over the window's own ws x ws grid) is tiled across the folded windows. As in the
    reference, the window shrinks to the map (and the shift is dropped) once the map is no larger
    than the window. A torch.fx leaf: window and shift depend on the runtime map size.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 4, shift: bool = False, num_kernels: int = 5,
                 gmm_mode: str = "mul", qkv_bias: bool = True, proj_drop: float = 0.):
        super().__init__()
        self.dim, self.num_heads, self.window_size, self.shift = dim, num_heads, window_size, shift
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.gmm = GaussianMixtureMask(num_heads, num_kernels, gmm_mode) if num_kernels else None
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.register_buffer("relative_position_index", _rel_index(window_size), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _rel_bias(self, window: int) -> torch.Tensor:
        if window == self.window_size:
            idx = self.relative_position_index
        else:  # a map smaller than the window: the window's central sub-table covers its offsets
            idx = _rel_index(window).to(self.relative_position_bias_table.device)
            r = 2 * self.window_size - 1
            dy, dx = idx // (2 * window - 1), idx % (2 * window - 1)
            off = self.window_size - window
            idx = (dy + off) * r + (dx + off)
        N = window * window
        return self.relative_position_bias_table[idx.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        shift = ws // 2 if self.shift else 0
        if min(H, W) <= ws:
            ws, shift = min(H, W), 0
        if H % ws or W % ws:
            raise ValueError(f"feature map {H}x{W} must be a multiple of the window size {ws}")
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        N, nW, nh, hd = ws * ws, (H // ws) * (W // ws), self.num_heads, self.head_dim
        qkv = self.qkv(_window_partition(x, ws).reshape(B, nW, N, C))
        q, k, v = qkv.view(B, nW, N, 3, nh, hd).permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * nh, N, hd).unbind(0)
        bias = self._rel_bias(ws)[None]                                          # (1, nh, N, N)
        if shift:
            bias = bias + shift_window_mask(H, W, ws, shift, x.device)[:, None].to(bias.dtype)
        else:
            bias = bias.expand(nW, nh, N, N)
        bias = bias.reshape(1, nW * nh, N, N)
        alpha = sigma = None
        if self.gmm is not None:
            alpha, sigma = self.gmm.effective()
        mode = self.gmm.mode if self.gmm is not None else "mul"
        out = gmm_kernel_attention(q, k, v, alpha, sigma, (ws, ws), mode, 0, self.scale, bias, nW)
        out = out.view(B, nW, nh, N, hd).permute(0, 1, 3, 2, 4).reshape(B * nW, ws, ws, C)
        out = self.proj_drop(self.proj(out))
        x = _window_reverse(out, ws, H, W)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, mlp_ratio: float, num_kernels: int,
                 gmm_mode: str, proj_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, num_heads, window_size, shift, num_kernels, gmm_mode,
                                           proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (reference order), LN, Linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 num_kernels: int, gmm_mode: str, downsample: bool, proj_drop: float, drop_path: Sequence[float]):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, num_heads, window_size, i % 2 == 1, mlp_ratio, num_kernels, gmm_mode, proj_drop,
                      drop_path[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class GmmSwin(nn.Module):
    """The reference's small-data Swin (embed 96, depths 2-6-4, heads 3-6-12, window 4, MLP 2, with
    absolute position embedding). forward_features returns the final normalised map as NCHW.

    Stages are laid out timm-style (patch merging at the start of stages 1..), which is the same
    computation as the reference's merge-at-the-end layers."""

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 3, num_classes: int = 100,
                 global_pool: str = "avg", embed_dim: int = 96, depths: Sequence[int] = (2, 6, 4),
                 num_heads: Sequence[int] = (3, 6, 12), window_size: int = 4, mlp_ratio: float = 2.,
                 num_kernels: int = 5, gmm_mode: str = "mul", drop_rate: float = 0., proj_drop_rate: float = 0.,
                 pos_drop_rate: float = 0., drop_path_rate: float = 0.):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=True)
        self.base_grid = (img_size // patch_size,) * 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_grid[0] * self.base_grid[1], embed_dim))
        trunc_normal_(self.pos_embed, std=.02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates, dpr = _linear_rates(drop_path_rate, sum(depths)), []
        for d in depths:
            dpr, rates = dpr + [rates[:d]], rates[d:]
        stages, dim, self.feature_info = [], embed_dim, []
        for i, (d, h) in enumerate(zip(depths, num_heads)):
            out_dim = embed_dim * 2 ** i
            stages.append(SwinStage(dim, out_dim, d, h, window_size, mlp_ratio, num_kernels, gmm_mode, i > 0,
                                    proj_drop_rate, dpr[i]))
            self.feature_info.append(dict(num_chs=out_dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
            dim = out_dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim)
        self.head = ClassifierHead(dim, num_classes, pool_type=_check_pool(global_pool, ("", "avg", "max", "avgmax")),
                                   drop_rate=drop_rate)
        self.apply(_trunc_init)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"} | {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^patch_embed|pos_embed",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+).downsample", (0,)),
                                                             (r"^stages\.(\d+)\.\w+\.(\d+)", None),
                                                             (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            _check_pool(global_pool, ("", "avg", "max", "avgmax"))
        self.head.reset(num_classes, pool_type=global_pool)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        _check_img(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        B, gh, gw, C = x.shape
        x = add_pos_embed(x.flatten(1, 2), self.pos_embed, 0, self.base_grid, (gh, gw))
        return self.pos_drop(x.view(B, gh, gw, C))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self._embed(x))
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        x = self._embed(x)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        inter, last = [], len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                inter.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return inter
        return self.norm(x).permute(0, 3, 1, 2), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# T2T-ViT

@register_notrace_function
def sinusoid_pos_embed(n: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, n, dim) fixed 1-D sinusoid table (T2T-ViT): sin on even, cos on odd channels."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    rate = torch.pow(10000.0, 2 * (torch.arange(dim) // 2).double() / dim)[None]
    t = pos / rate
    t[:, 0::2], t[:, 1::2] = torch.sin(t[:, 0::2]), torch.cos(t[:, 1::2])
    return t[None].to(device=device, dtype=dtype)


@torch.fx.wrap
@register_notrace_function
def add_sinusoid(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    if table.shape[1] != x.shape[1]:
        table = sinusoid_pos_embed(x.shape[1], x.shape[2], x.device, x.dtype)
    return x + table


class TokenTransformer(nn.Module):
    """T2T's single-head token layer: attention widens dim -> token_dim (scale from the *input*
    width, as upstream) with the values as the residual, then an MLP of ratio 1."""

    def __init__(self, dim: int, token_dim: int, num_kernels: int, gmm_mode: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GmmAttention(dim, 1, token_dim, out_dim=token_dim, num_kernels=num_kernels, gmm_mode=gmm_mode,
                                 scale=dim ** -0.5)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = FeedForward(token_dim, token_dim)

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        out, v = self.attn.attend(self.norm1(x), grid)
        x = v.squeeze(1) + self.attn.proj_drop(self.attn.proj(out))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Soft split (3x3 unfold, stride 2) -> token layer, repeated; the last split is projected to
    embed_dim. Two splits + one token layer at 32 px, three + two at 64 px (the reference's
    configs); ``num_token_layers`` selects that."""

    def __init__(self, in_chans: int, embed_dim: int, token_dim: int, num_token_layers: int, num_kernels: int,
                 gmm_mode: str):
        super().__init__()
        self.token_layers = nn.ModuleList([
            TokenTransformer(in_chans * 9 if i == 0 else token_dim * 9, token_dim, num_kernels, gmm_mode)
            for i in range(num_token_layers)])
        self.project = nn.Linear(token_dim * 9, embed_dim)
        self.reduction = 2 ** (num_token_layers + 1)

    @staticmethod
    def _split(x: torch.Tensor):
        grid = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2)
        return F.unfold(x, 3, padding=1, stride=2).transpose(1, 2), grid

    def forward(self, x: torch.Tensor):
        x, grid = self._split(x)
        for layer in self.token_layers:
            x = layer(x, grid)
            x, grid = self._split(x.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1]))
        return self.project(x), grid


class GmmT2T(_TokenModel):
    """The reference's small-data T2T-ViT (embed 256, 12 blocks of 4 heads, MLP 2, token width 64,
    fixed sinusoid positions, no cls token, mean-pooled). The reference's unused cls token is
    left out."""

    def __init__(self, img_size: int = 32, in_chans: int = 3, num_classes: int = 100, global_pool: str = "avg",
                 embed_dim: int = 256, depth: int = 12, num_heads: int = 4, mlp_ratio: float = 2., token_dim: int = 64,
                 num_token_layers: Optional[int] = None, num_kernels: int = 5, gmm_mode: str = "mul",
                 drop_rate: float = 0., proj_drop_rate: float = 0., pos_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        num_token_layers = num_token_layers or (2 if img_size >= 64 else 1)
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.tokens_to_token = T2TModule(in_chans, embed_dim, token_dim, num_token_layers, num_kernels, gmm_mode)
        red = self.tokens_to_token.reduction
        n = (img_size // red) ** 2
        self.register_buffer("pos_embed", sinusoid_pos_embed(n, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = _linear_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, embed_dim // num_heads, int(embed_dim * mlp_ratio), num_kernels, gmm_mode,
                  proj_drop=proj_drop_rate, drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature_info = [dict(num_chs=embed_dim, reduction=red, module=f"blocks.{i}") for i in range(depth)]
        self._init_head(num_classes, self._valid_pool(global_pool), drop_rate, fc_norm=False)
        self.apply(_trunc_init)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^tokens_to_token", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        _check_img(x, self.in_chans, self.tokens_to_token.reduction)
        x, grid = self.tokens_to_token(x)
        return self.pos_drop(add_sinusoid(x, self.pos_embed)), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = checkpoint(blk, x, grid) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x, grid)
        return self.norm(x)

    forward_intermediates = GmmViT.forward_intermediates
    prune_intermediate_layers = GmmViT.prune_intermediate_layers


# ----------------------------------------------------------------------------------------------
# reference checkpoints -> these modules

def _reference_patch_linear(w: torch.Tensor, patch: int, in_chans: int) -> torch.Tensor:
    """Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)') + Linear weight (D, p·p·c) -> conv (D, c, p, p)."""
    return w.reshape(w.shape[0], patch, patch, in_chans).permute(0, 3, 1, 2)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """State dicts of the reference code (models/vit.py; other hosts: fixed tables dropped and the
    mixture transposed) -> this module. Our own state dicts pass through unchanged."""
    sd = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if "to_patch_embedding.1.weight" not in sd and not any(k.endswith(".mask.alpha") or k.endswith("mask.mask")
                                                           or k == "mask" for k in sd):
        return sd
    if not isinstance(model, GmmViT):
        out = {}
        for k, v in sd.items():
            if k == "mask" or k.endswith(".mask") or k.endswith(".mask.mask"):
                continue  # fixed distance tables: recomputed, never stored
            if k.endswith(".mask.alpha") or k.endswith(".mask.sigma"):
                v = v.reshape(v.shape[0], -1).t()
                k = k.replace(".mask.", ".gmm.")
            out[k] = v
        return out
    out = {}
    p = model.patch_embed.patch_size
    for k, v in sd.items():
        if k == "mask" or k.endswith("mask.mask"):
            continue
        if k == "pos_embedding":
            out["pos_embed"] = v
        elif k == "cls_token":
            out["cls_token"] = v
        elif k == "to_patch_embedding.1.weight":
            out["patch_embed.proj.weight"] = _reference_patch_linear(v, p, model.in_chans)
        elif k == "to_patch_embedding.1.bias":
            out["patch_embed.proj.bias"] = v
        elif k.startswith("mlp_head.0."):
            out["fc_norm." + k.split(".")[-1]] = v
        elif k.startswith("mlp_head.1."):
            out["head." + k.split(".")[-1]] = v
        elif k.startswith("transformer.layers."):
            parts = k.split(".")
            i, j, rest = parts[2], parts[3], ".".join(parts[4:])
            dst = f"blocks.{i}."
            table = {
                "0": {"norm.weight": "norm1.weight", "norm.bias": "norm1.bias", "fn.to_qkv.weight": "attn.qkv.weight",
                      "fn.to_out.0.weight": "attn.proj.weight", "fn.to_out.0.bias": "attn.proj.bias",
                      "fn.mask.alpha": "attn.gmm.alpha", "fn.mask.sigma": "attn.gmm.sigma"},
                "1": {"norm.weight": "norm2.weight", "norm.bias": "norm2.bias", "fn.net.0.weight": "mlp.fc1.weight",
                      "fn.net.0.bias": "mlp.fc1.bias", "fn.net.3.weight": "mlp.fc2.weight",
                      "fn.net.3.bias": "mlp.fc2.bias"},
            }[j]
            if rest not in table:
                raise KeyError(f"checkpoint_filter_fn: unexpected reference key {k!r}")
            if rest.startswith("fn.mask."):
                v = v.reshape(v.shape[0], -1).t()
            out[dst + table[rest]] = v
        else:
            raise KeyError(f"checkpoint_filter_fn: unexpected reference key {k!r}")
    return out


# ----------------------------------------------------------------------------------------------
# pretrained cfgs and entry points

_ORIGIN = "https://github.com/CatworldLee/Gaussian-Mixture-Mask-Attention"
_CIFAR100 = dict(mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
_TINY_IN = dict(mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821))


def _cfg(size: int = 32, classifier: str = "head", pool_size=None, first_conv: str = "patch_embed.proj", **kwargs):
    stats = _CIFAR100 if size == 32 else _TINY_IN
    return hub.cfg(
        url="", num_classes=100 if size == 32 else 200, input_size=(3, size, size), pool_size=pool_size,
        crop_pct=1.0, interpolation="bicubic", fixed_input_size=False, first_conv=first_conv,
        classifier=classifier, license="none (upstream repository has no licence; no weights released)",
        paper_ids="arXiv:2309.05375", paper_name="Toward a Deeper Understanding: RetNet Viewed through Convolution",
        origin_url=_ORIGIN, **stats, **kwargs)


_T2T = dict(first_conv="tokens_to_token.token_layers.0.attn.qkv")
default_cfgs = generate_default_cfgs({
    **{f"{n}": _cfg(32) for n in ("gmm_vit_tiny_p4_32", "vit_tiny_p4_32_gmmbase", "gmm_cait_tiny_p4_32",
                                  "cait_tiny_p4_32_gmmbase", "gmm_pit_tiny_p2_32", "pit_tiny_p2_32_gmmbase")},
    **{f"{n}": _cfg(64) for n in ("gmm_vit_tiny_p8_64", "vit_tiny_p8_64_gmmbase", "gmm_cait_tiny_p8_64",
                                  "cait_tiny_p8_64_gmmbase", "gmm_pit_tiny_p4_64", "pit_tiny_p4_64_gmmbase")},
    "gmm_swin_tiny_p2_32": _cfg(32, "head.fc", (4, 4)),
    "swin_tiny_p2_32_gmmbase": _cfg(32, "head.fc", (4, 4)),
    "gmm_swin_tiny_p4_64": _cfg(64, "head.fc", (4, 4)),
    "swin_tiny_p4_64_gmmbase": _cfg(64, "head.fc", (4, 4)),
    "gmm_t2t_vit_32": _cfg(32, **_T2T),
    "t2t_vit_32_gmmbase": _cfg(32, **_T2T),
    "gmm_t2t_vit_64": _cfg(64, **_T2T),
    "t2t_vit_64_gmmbase": _cfg(64, **_T2T),
})


def _create(cls, variant: str, pretrained: bool = False, **kwargs):
    # every stage / block by default, so features_only matches feature_info
    n = len(kwargs["depths"]) if "depths" in kwargs else kwargs["depth"]
    feature_cfg = dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", tuple(range(n))))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return hub.build_model(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           feature_cfg=feature_cfg, **kwargs)


_VIT = dict(embed_dim=192, depth=9, num_heads=12, head_dim=16, mlp_ratio=2.)
_SWIN = dict(embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12), window_size=4, mlp_ratio=2.)
_CAIT = dict(embed_dim=108, depth=24, depth_token_only=2, num_heads=4, head_dim=64, mlp_hidden=384)
_PIT = dict(embed_dim=96, depths=(2, 6, 4), num_heads=(2, 4, 8), mlp_ratio=2.)
_T2T_ARGS = dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2., token_dim=64)


def _variant(cls, base: dict, size: int, gmm: bool, **fixed):
    def fn(variant, pretrained=False, **kwargs):
        args = dict(base, img_size=size, num_kernels=5 if gmm else 0, num_classes=100 if size == 32 else 200, **fixed)
        if not gmm:
            for k in ("num_kernels", "gmm_mode"):
                if kwargs.get(k):
                    raise ValueError(f"{variant} is the baseline without the mixture; use the gmm_ model for {k}")
        return _create(cls, variant, pretrained, **dict(args, **kwargs))
    return fn


@register_model
def gmm_vit_tiny_p4_32(pretrained: bool = False, **kwargs) -> GmmViT:
    """GMM-ViT for 32 px (CIFAR / SVHN): patch 4, 9 x 192, 12 heads; no cls token, mean pool."""
    return _variant(GmmViT, _VIT, 32, True, patch_size=4)("gmm_vit_tiny_p4_32", pretrained, **kwargs)


@register_model
def vit_tiny_p4_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmViT:
    """The reference's baseline ViT for 32 px (cls token), the GMM-ViT comparison point."""
    return _variant(GmmViT, _VIT, 32, False, patch_size=4)("vit_tiny_p4_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_vit_tiny_p8_64(pretrained: bool = False, **kwargs) -> GmmViT:
    """GMM-ViT for 64 px (Tiny-ImageNet): patch 8."""
    return _variant(GmmViT, _VIT, 64, True, patch_size=8)("gmm_vit_tiny_p8_64", pretrained, **kwargs)


@register_model
def vit_tiny_p8_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmViT:
    """Baseline ViT for 64 px (Tiny-ImageNet): patch 8, cls token."""
    return _variant(GmmViT, _VIT, 64, False, patch_size=8)("vit_tiny_p8_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_swin_tiny_p2_32(pretrained: bool = False, **kwargs) -> GmmSwin:
    """GMM-Swin for 32 px: patch 2, window 4, mixture over each window's 4x4 tokens."""
    return _variant(GmmSwin, _SWIN, 32, True, patch_size=2)("gmm_swin_tiny_p2_32", pretrained, **kwargs)


@register_model
def swin_tiny_p2_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmSwin:
    """Baseline small-data Swin for 32 px."""
    return _variant(GmmSwin, _SWIN, 32, False, patch_size=2)("swin_tiny_p2_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_swin_tiny_p4_64(pretrained: bool = False, **kwargs) -> GmmSwin:
    """GMM-Swin for 64 px: patch 4."""
    return _variant(GmmSwin, _SWIN, 64, True, patch_size=4)("gmm_swin_tiny_p4_64", pretrained, **kwargs)


@register_model
def swin_tiny_p4_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmSwin:
    """Baseline small-data Swin for 64 px."""
    return _variant(GmmSwin, _SWIN, 64, False, patch_size=4)("swin_tiny_p4_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_cait_tiny_p4_32(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """GMM-CaiT (the reference's cait-tiny) for 32 px: patch 4, 24 + 2 layers of width 108."""
    return _variant(GmmCaiT, _CAIT, 32, True, patch_size=4)("gmm_cait_tiny_p4_32", pretrained, **kwargs)


@register_model
def cait_tiny_p4_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """Baseline cait-tiny for 32 px."""
    return _variant(GmmCaiT, _CAIT, 32, False, patch_size=4)("cait_tiny_p4_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_cait_tiny_p8_64(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """GMM-CaiT for 64 px: patch 8."""
    return _variant(GmmCaiT, _CAIT, 64, True, patch_size=8)("gmm_cait_tiny_p8_64", pretrained, **kwargs)


@register_model
def cait_tiny_p8_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmCaiT:
    """Baseline cait-tiny for 64 px."""
    return _variant(GmmCaiT, _CAIT, 64, False, patch_size=8)("cait_tiny_p8_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_pit_tiny_p2_32(pretrained: bool = False, **kwargs) -> GmmPiT:
    """GMM-PiT for 32 px: patch 2, channels 96-192-384, heads 2-4-8 of width 48."""
    return _variant(GmmPiT, _PIT, 32, True, patch_size=2)("gmm_pit_tiny_p2_32", pretrained, **kwargs)


@register_model
def pit_tiny_p2_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmPiT:
    """Baseline small-data PiT for 32 px."""
    return _variant(GmmPiT, _PIT, 32, False, patch_size=2)("pit_tiny_p2_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_pit_tiny_p4_64(pretrained: bool = False, **kwargs) -> GmmPiT:
    """GMM-PiT for 64 px: patch 4."""
    return _variant(GmmPiT, _PIT, 64, True, patch_size=4)("gmm_pit_tiny_p4_64", pretrained, **kwargs)


@register_model
def pit_tiny_p4_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmPiT:
    """Baseline small-data PiT for 64 px."""
    return _variant(GmmPiT, _PIT, 64, False, patch_size=4)("pit_tiny_p4_64_gmmbase", pretrained, **kwargs)


@register_model
def gmm_t2t_vit_32(pretrained: bool = False, **kwargs) -> GmmT2T:
    """GMM-T2T-ViT for 32 px: one token layer (16x16), 8x8 tokens, 12 x 256."""
    return _variant(GmmT2T, _T2T_ARGS, 32, True)("gmm_t2t_vit_32", pretrained, **kwargs)


@register_model
def t2t_vit_32_gmmbase(pretrained: bool = False, **kwargs) -> GmmT2T:
    """Baseline small-data T2T-ViT for 32 px."""
    return _variant(GmmT2T, _T2T_ARGS, 32, False)("t2t_vit_32_gmmbase", pretrained, **kwargs)


@register_model
def gmm_t2t_vit_64(pretrained: bool = False, **kwargs) -> GmmT2T:
    """GMM-T2T-ViT for 64 px: two token layers, 8x8 tokens."""
    return _variant(GmmT2T, _T2T_ARGS, 64, True)("gmm_t2t_vit_64", pretrained, **kwargs)


@register_model
def t2t_vit_64_gmmbase(pretrained: bool = False, **kwargs) -> GmmT2T:
    """Baseline small-data T2T-ViT for 64 px."""
    return _variant(GmmT2T, _T2T_ARGS, 64, False)("t2t_vit_64_gmmbase", pretrained, **kwargs)
