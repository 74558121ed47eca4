"""CaiT host: talking-heads patch attention (the mixture before the head mixing) + class attention."""
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.layers import DropPath

import zoo.kernels as _kernels
from zoo.layers.gmm_attention import GaussianMixtureMask

from ._host import (LUCIDRAINS_STEM_HEAD_RULES, FeedForward, PatchEmbed, TokenHost, add_pos_embed,
                    prenorm_pair_rules, reference_patch_linear, rename_reference, xavier_init)

__all__ = ["GmmCaiT", "TalkingHeadsAttention"]

torch.fx.wrap("add_pos_embed")  # a leaf in this module too (fx patches the calling module's globals)


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
        score_mod = self.gmm.score_mod(grid) if self.gmm is not None else None
        out = _kernels.attention(q, k, v, scale=self.scale, score_mod=score_mod,
                                 head_mix=_kernels.TalkingHeads(self.mix_pre, self.mix_post))
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


class GmmCaiT(TokenHost):
    """The reference's small-data CaiT (``cait-tiny``: dim 108, 24 patch + 2 class layers, 4 heads of
    64, MLP 384). forward_features returns (B, 1 + N, C): the cls token after class attention, then
    the patch tokens; intermediates are the patch blocks' outputs (no cls token yet)."""

    num_prefix_tokens = 1
    _block_prefix = 0

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
        self.apply(xavier_init)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^blocks_token_only\.(\d+)", None), (r"^fc_norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        x, grid = self._patchify(x)
        return self.pos_drop(add_pos_embed(x, self.pos_embed, 0, self.base_grid, grid)), grid

    def _finish(self, x: torch.Tensor, grid) -> torch.Tensor:
        """Class attention: the cls token attends to the patch tokens, then leads the sequence."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls = blk(cls, grid, x)
        return self.norm(torch.cat([cls, x], dim=1))

    def _prune_head(self):
        self.blocks_token_only = nn.ModuleList()
        super()._prune_head()


# reference models/cait.py: [LayerScale(PreNorm(Attention)), LayerScale(PreNorm(FeedForward))] pairs,
# patch_transformer -> blocks, cls_transformer -> blocks_token_only
_LAYER = r"(patch|cls)_transformer\.layers\.(\d+)"
_REFERENCE_RULES = LUCIDRAINS_STEM_HEAD_RULES + (
    (r"to_patch_embedding\.1\.bias", r"patch_embed.proj.bias"),
    (_LAYER + r"\.0\.scale", r"\1.\2.gamma_1"),
    (_LAYER + r"\.1\.scale", r"\1.\2.gamma_2"),
    (_LAYER + r"\.0\.fn\.fn\.to_q\.weight", r"\1.\2.attn.q.weight"),
    (_LAYER + r"\.0\.fn\.fn\.to_kv\.weight", r"\1.\2.attn.kv.weight"),
    (_LAYER + r"\.0\.fn\.fn\.mix_heads_pre_attn", r"\1.\2.attn.mix_pre"),
    (_LAYER + r"\.0\.fn\.fn\.mix_heads_post_attn", r"\1.\2.attn.mix_post"),
) + prenorm_pair_rules(_LAYER, r"\1.\2", wrap="fn.")


def reference_filter(sd: Dict[str, torch.Tensor], model: GmmCaiT) -> Dict[str, torch.Tensor]:
    """The reference CaiT's state dict -> GmmCaiT (LayerScale (1, 1, C) -> (C,), Linear patch
    embedding -> conv)."""
    w = sd.get("to_patch_embedding.1.weight")
    out = {}
    for k, v in rename_reference({k: v for k, v in sd.items() if k != "to_patch_embedding.1.weight"},
                                 _REFERENCE_RULES, (), "CaiT").items():
        if k.startswith(("patch.", "cls.")):
            group, _, rest = k.partition(".")
            k = ("blocks." if group == "patch" else "blocks_token_only.") + rest
        if k.endswith((".gamma_1", ".gamma_2")):
            v = v.reshape(-1)
        out[k] = v
    if w is not None:
        out["patch_embed.proj.weight"] = reference_patch_linear(w, model.patch_embed.patch_size, model.in_chans)
    return out
