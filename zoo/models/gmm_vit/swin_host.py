"""Swin host: (shifted-)window attention with the mixture over each window's own tokens."""
from typing import Dict, Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, trunc_normal_
from timm.models._features_fx import register_notrace_function, register_notrace_module
from timm.models._manipulate import checkpoint_seq

import zoo.kernels as _kernels
from zoo.layers.weight_init import init_linear_trunc_normal
from zoo.layers.gmm_attention import GaussianMixtureMask

from ._host import FeedForward, GmmHost, PatchEmbed, add_pos_embed, check_pool, linear_rates, rename_reference

__all__ = ["GmmSwin", "ShiftedWindowAttention"]

torch.fx.wrap("add_pos_embed")  # a leaf in this module too (fx patches the calling module's globals)

_SWIN_POOLS = ("", "avg", "max", "avgmax")


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
        score_mod = self.gmm.score_mod((ws, ws), head_repeat=nW) if self.gmm is not None else None
        out = _kernels.attention(q, k, v, scale=self.scale, bias=bias, score_mod=score_mod)
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
        if self.grad_checkpointing:
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class GmmSwin(GmmHost):
    """The reference's small-data Swin (embed 96, depths 2-6-4, heads 3-6-12, window 4, MLP 2, with
    absolute position embedding). forward_features returns the final normalised map as NCHW.

    Stages are laid out timm-style (patch merging at the start of stages 1..), which is the same
    computation as the reference's merge-at-the-end layers."""

    _units_name = "stages"
    _output_fmts = ("NCHW", "NHWC")

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
        rates, dpr = linear_rates(drop_path_rate, sum(depths)), []
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
        self.head = ClassifierHead(dim, num_classes, pool_type=check_pool(global_pool, _SWIN_POOLS),
                                   drop_rate=drop_rate)
        self.apply(init_linear_trunc_normal)

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
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        if global_pool is not None:
            check_pool(global_pool, _SWIN_POOLS)
        self.head.reset(num_classes, pool_type=global_pool)

    def _embed(self, x: torch.Tensor):
        B = x.shape[0]
        x, (gh, gw) = self._patchify(x)
        x = add_pos_embed(x, self.pos_embed, 0, self.base_grid, (gh, gw))
        return self.pos_drop(x.view(B, gh, gw, -1)), (gh, gw)

    def _step(self, unit: nn.Module, x: torch.Tensor, grid):
        return unit(x), grid

    def _feature(self, x: torch.Tensor, grid, index: int, norm: bool, output_fmt: str) -> torch.Tensor:
        y = self.norm(x) if norm and index == len(self.stages) - 1 else x
        return y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y

    def _finish(self, x: torch.Tensor, grid) -> torch.Tensor:
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)


def reference_filter(sd: Dict[str, torch.Tensor], model: GmmSwin) -> Dict[str, torch.Tensor]:
    """The reference Swin's state dict -> GmmSwin. Its layer i ends with the patch merging that
    opens our stage i + 1; fixed index tables and shift masks are recomputed, not loaded."""
    rules = (
        (r"absolute_pos_embed", r"pos_embed"),
        (r"patch_embed\.(proj|norm)\.(weight|bias)", r"patch_embed.\1.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
        (r"head\.(weight|bias)", r"head.fc.\1"),
        (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.mask\.(alpha|sigma)", r"stages.\1.blocks.\2.attn.gmm.\3"),
        (r"layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
         r"stages.\1.blocks.\2.\3.\4"),
        (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
         r"stages.\1.blocks.\2.attn.relative_position_bias_table"),
        (r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)", r"@\1.downsample.\2.\3"),
    )
    drop = (r"layers\.\d+\.blocks\.\d+\.attn_mask", r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")
    out = {}
    for k, v in rename_reference(sd, rules, drop, "Swin").items():
        if k.startswith("@"):
            index, _, rest = k[1:].partition(".")
            k = f"stages.{int(index) + 1}.{rest}"
        out[k] = v
    return out
