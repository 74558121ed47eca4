"""PiT host: the reference's small-data pooling-based ViT; the mixture acts on the patch-patch block."""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.models._manipulate import checkpoint

from ._host import (LUCIDRAINS_STEM_HEAD_RULES, Block, PatchEmbed, TokenHost, add_pos_embed, check_pool,
                    prenorm_pair_rules, rename_reference, xavier_init)

__all__ = ["GmmPiT"]

torch.fx.wrap("add_pos_embed")  # a leaf in this module too (fx patches the calling module's globals)


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
            x = checkpoint(blk, x, grid) if self.grad_checkpointing else blk(x, grid)
        return x, grid


class GmmPiT(TokenHost):
    """The reference's small-data PiT: conv patch embed, cls token, three stages joined by
    depthwise-conv pooling; the mixture acts on the patch-patch block of every layer.

    forward_features returns (B, 1 + N, C) tokens (cls first), as timm's PiT does with its cls token.
    """

    num_prefix_tokens = 1
    _units_name = "stages"
    _output_fmts = ("NCHW",)

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
        self.in_chans = in_chans
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
        self._init_head(num_classes, check_pool(global_pool), drop_rate, fc_norm=True)
        self.apply(xavier_init)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^stages\.(\d+)", None) if coarse else (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                            (r"^stages\.(\d+)\.pool", (0,)), (r"^fc_norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        x, grid = self._patchify(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(add_pos_embed(x, self.pos_embed, 1, self.base_grid, grid)), grid

    def _step(self, unit: nn.Module, x: torch.Tensor, grid):
        return unit(x, grid)


def reference_filter(sd: Dict[str, torch.Tensor], model: GmmPiT) -> Dict[str, torch.Tensor]:
    """The reference PiT's state dict -> GmmPiT. Its ``layers`` alternate transformer stages
    (even index 2i: stage i) and pooling layers (odd index 2i - 1: the pooling that opens stage i)."""
    rules = LUCIDRAINS_STEM_HEAD_RULES + (
        (r"to_patch_embedding\.0\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"layers\.(\d+)\.downsample\.net\.0\.(weight|bias)", r"@\1.pool.dw.\2"),
        (r"layers\.(\d+)\.downsample\.net\.1\.(weight|bias)", r"@\1.pool.pw.\2"),
        (r"layers\.(\d+)\.cls_ff\.(weight|bias)", r"@\1.pool.cls_fc.\2"),
    ) + prenorm_pair_rules(r"layers\.(\d+)\.layers\.(\d+)", r"@\1.blocks.\2")
    out = {}
    for k, v in rename_reference(sd, rules, (), "PiT").items():
        if k.startswith("@"):  # reference layer index -> our stage index
            index, _, rest = k[1:].partition(".")
            k = f"stages.{(int(index) + 1) // 2}.{rest}"
        out[k] = v
    return out
