"""ViT host: the reference's small-data (lucidrains-style) ViT, GMM in every layer."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ._host import (LUCIDRAINS_STEM_HEAD_RULES, Block, PatchEmbed, TokenHost, add_pos_embed, prenorm_pair_rules,
                    reference_patch_linear, rename_reference, xavier_init)

__all__ = ["GmmViT"]

torch.fx.wrap("add_pos_embed")  # a leaf in this module too (fx patches the calling module's globals)


class GmmViT(TokenHost):
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
        self.apply(xavier_init)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^fc_norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        x, grid = self._patchify(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = add_pos_embed(x, self.pos_embed, self.num_prefix_tokens, self.base_grid, grid)
        return self.pos_drop(x), grid


# reference models/vit.py: [PreNorm(Attention), PreNorm(FeedForward)] pairs under transformer.layers
_REFERENCE_RULES = LUCIDRAINS_STEM_HEAD_RULES + (
    (r"to_patch_embedding\.1\.bias", r"patch_embed.proj.bias"),
) + prenorm_pair_rules(r"transformer\.layers\.(\d+)", r"blocks.\1")


def reference_filter(sd: Dict[str, torch.Tensor], model: GmmViT) -> Dict[str, torch.Tensor]:
    """The reference ViT's state dict -> GmmViT (its Linear patch embedding becomes the conv)."""
    w = sd.get("to_patch_embedding.1.weight")
    out = rename_reference({k: v for k, v in sd.items() if k != "to_patch_embedding.1.weight"},
                           _REFERENCE_RULES, (), "ViT")
    if w is not None:
        out["patch_embed.proj.weight"] = reference_patch_linear(w, model.patch_embed.patch_size, model.in_chans)
    return out
