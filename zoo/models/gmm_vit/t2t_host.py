"""T2T-ViT host: tokens-to-token soft splits with single-head token layers, then a ViT encoder;
the mixture acts in both."""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function

from zoo.layers.weight_init import init_linear_trunc_normal
from zoo.layers.gmm_attention import GmmAttention

from ._host import Block, FeedForward, TokenHost, check_img, linear_rates, rename_reference

__all__ = ["GmmT2T"]

torch.fx.wrap("check_img")  # a leaf in this module too (fx patches the calling module's globals)


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


class GmmT2T(TokenHost):
    """The reference's small-data T2T-ViT (embed 256, 12 blocks of 4 heads, MLP 2, token width 64,
    fixed sinusoid positions, no cls token, mean-pooled). The reference's unused cls token is
    left out. Its encoder blocks compute x + attn(LN x) + LN x (see ``Block``); ``norm_residual=False``
    gives the plain pre-norm block instead."""

    def __init__(self, img_size: int = 32, in_chans: int = 3, num_classes: int = 100, global_pool: str = "avg",
                 embed_dim: int = 256, depth: int = 12, num_heads: int = 4, mlp_ratio: float = 2., token_dim: int = 64,
                 num_token_layers: Optional[int] = None, num_kernels: int = 5, gmm_mode: str = "mul",
                 drop_rate: float = 0., proj_drop_rate: float = 0., pos_drop_rate: float = 0.,
                 drop_path_rate: float = 0., norm_residual: bool = True):
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
        dpr = linear_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, embed_dim // num_heads, int(embed_dim * mlp_ratio), num_kernels, gmm_mode,
                  proj_drop=proj_drop_rate, drop_path=dpr[i], norm_residual=norm_residual) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature_info = [dict(num_chs=embed_dim, reduction=red, module=f"blocks.{i}") for i in range(depth)]
        self._init_head(num_classes, self._valid_pool(global_pool), drop_rate, fc_norm=False)
        self.apply(init_linear_trunc_normal)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^tokens_to_token", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _embed(self, x: torch.Tensor):
        check_img(x, self.in_chans, self.tokens_to_token.reduction)
        x, grid = self.tokens_to_token(x)
        return self.pos_drop(add_sinusoid(x, self.pos_embed)), grid


def reference_filter(sd: Dict[str, torch.Tensor], model: GmmT2T) -> Dict[str, torch.Tensor]:
    """The reference T2T-ViT's state dict -> GmmT2T. Dropped: its fixed sinusoid table, its unused
    cls token and its unused ``tokens_to_token.norm`` (the reference's forward never calls them)."""
    rules = (
        (r"tokens_to_token\.attention(\d)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
         r"@\1.\2.\3"),
        (r"tokens_to_token\.attention(\d)\.attn\.mask\.(alpha|sigma)", r"@\1.attn.gmm.\2"),
        (r"tokens_to_token\.project\.(weight|bias)", r"tokens_to_token.project.\1"),
        (r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks.\1.\2.\3"),
        (r"blocks\.(\d+)\.attn\.mask\.(alpha|sigma)", r"blocks.\1.attn.gmm.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
        (r"head\.(weight|bias)", r"head.\1"),
    )
    drop = (r"pos_embed", r"cls_token", r"tokens_to_token\.norm\.(weight|bias)")
    out = {}
    for k, v in rename_reference(sd, rules, drop, "T2T").items():
        if k.startswith("@"):  # attention1, attention2 -> token_layers.0, .1
            index, _, rest = k[1:].partition(".")
            k = f"tokens_to_token.token_layers.{int(index) - 1}.{rest}"
        out[k] = v
    return out
