"""What the five GMM hosts share: input checks, patch embedding, the pre-norm block, inits, and the
timm plumbing (forward_features / forward_intermediates / pruning / heads) written once.

A host describes itself through a few hooks and inherits the rest:

- ``_embed(x) -> (tokens, grid)``: input checks, tokenisation and position embedding;
- ``_units_name``: the attribute holding the blocks or stages that ``feature_info`` indexes;
- ``_step(unit, x, grid) -> (x, grid)``: run one of them (default: a block taking ``(x, grid)``);
- ``_feature(x, grid, index, norm, output_fmt)``: one intermediate in the requested layout;
- ``_finish(x, grid)``: what ``forward_features`` returns after the last unit.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import checkpoint

from zoo.errors import NotScriptable
from zoo.layers.gmm_attention import GmmAttention

POOLS = ("", "avg", "token")


def check_pool(global_pool: str, allowed: Sequence[str] = POOLS) -> str:
    if global_pool not in allowed:
        raise ValueError(f"global_pool must be one of {tuple(allowed)}, got {global_pool!r}")
    return global_pool


def xavier_init(m: nn.Module):
    """The reference's init for its lucidrains-style hosts (ViT, CaiT, PiT)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def linear_rates(rate: float, n: int) -> List[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` (plain floats: works on the meta device)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


@torch.fx.wrap
@register_notrace_function
def check_img(x: torch.Tensor, in_chans: int, multiple: int) -> None:
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


def tokens_to_nchw(x: torch.Tensor, num_prefix_tokens: int, grid) -> torch.Tensor:
    return x[:, num_prefix_tokens:].reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> NHWC tokens. A conv is the reference's rearrange + Linear with the
    weight reshaped (see ``reference_patch_linear``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FeedForward(Mlp):
    """timm's Mlp (fc1 -> GELU -> fc2) named for the hosts."""


class Block(nn.Module):
    """Pre-norm block: x + attn(LN x), x + mlp(LN x) (ViT, PiT and T2T's encoder).

    ``norm_residual`` adds the normalised input once more, x + drop_path(attn(LN x) + LN x): the
    reference T2T encoder's attention returns its input plus its output, inside the block's residual.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, num_kernels: int = 5,
                 gmm_mode: str = "mul", num_prefix_tokens: int = 0, qkv_bias: bool = False,
                 proj_drop: float = 0., drop_path: float = 0., norm_residual: bool = False):
        super().__init__()
        self.norm_residual = norm_residual
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GmmAttention(dim, num_heads, head_dim, qkv_bias=qkv_bias, num_kernels=num_kernels,
                                 gmm_mode=gmm_mode, num_prefix_tokens=num_prefix_tokens, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        h = self.norm1(x)
        y = self.attn(h, grid)
        if self.norm_residual:
            y = y + h
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class GmmHost(NotScriptable, nn.Module):
    """timm plumbing shared by the hosts (see the module docstring for the hooks).

    TorchScript is not supported (the mixture's score mod is a Python object handed to the op):
    ``torch.jit.script`` raises ``zoo.errors.UnsupportedError`` naming torch.compile / torch.export.
    """

    _units_name = "blocks"
    _output_fmts: Tuple[str, ...] = ("NCHW",)

    def _units(self) -> nn.Module:
        return getattr(self, self._units_name)

    def _patchify(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Checked image -> (B, gh·gw, C) patch tokens and the grid (gh, gw)."""
        check_img(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        return x.flatten(1, 2), x.shape[1:3]

    def _step(self, unit: nn.Module, x: torch.Tensor, grid):
        return (checkpoint(unit, x, grid) if self.grad_checkpointing else unit(x, grid)), grid

    def _finish(self, x: torch.Tensor, grid) -> torch.Tensor:
        return self.norm(x)

    def _prune_head(self):
        self.reset_classifier(0, "")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for unit in self._units():
            if hasattr(unit, "grad_checkpointing"):
                unit.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        for unit in self._units():
            x, grid = self._step(unit, x, grid)
        return self._finish(x, grid)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        if output_fmt not in self._output_fmts:
            raise ValueError(f"output_fmt must be one of {self._output_fmts}, got {output_fmt!r}")
        units = self._units()
        take, max_index = feature_take_indices(len(units), indices)
        x, grid = self._embed(x)
        inter = []
        for i, unit in enumerate(units[:max_index + 1] if stop_early else units):
            x, grid = self._step(unit, x, grid)
            if i in take:
                inter.append(self._feature(x, grid, i, norm, output_fmt))
        if intermediates_only:
            return inter
        return self._finish(x, grid), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, max_index = feature_take_indices(len(self._units()), indices)
        setattr(self, self._units_name, self._units()[:max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self._prune_head()
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TokenHost(GmmHost):
    """Hosts whose features are a token sequence (B, prefix + N, C), as timm's vision_transformer
    returns them (ViT, CaiT, PiT, T2T): pooled by cls token or mean, then ``fc_norm`` and a Linear head.
    ``_block_prefix`` counts the prefix tokens inside the blocks (CaiT adds its cls token after them)."""

    num_prefix_tokens: int = 0
    _output_fmts = ("NCHW", "NLC")

    @property
    def _block_prefix(self) -> int:
        return self.num_prefix_tokens

    def _init_head(self, num_classes: int, global_pool: str, drop_rate: float, fc_norm: bool):
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc_norm = nn.LayerNorm(self.num_features) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _valid_pool(self, global_pool: str) -> str:
        return check_pool(global_pool, POOLS if self.num_prefix_tokens else ("", "avg"))

    def _feature(self, x: torch.Tensor, grid, index: int, norm: bool, output_fmt: str) -> torch.Tensor:
        y = self.norm(x) if norm else x
        p = self._block_prefix
        return tokens_to_nchw(y, p, grid) if output_fmt == "NCHW" else y[:, p:]

    def _prune_head(self):
        self.fc_norm = nn.Identity()
        self.reset_classifier(0, "")

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._valid_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)


# ----------------------------------------------------------------------------------------------
# reference state dicts (CatworldLee/Gaussian-Mixture-Mask-Attention) -> these modules

def reference_patch_linear(w: torch.Tensor, patch: int, in_chans: int) -> torch.Tensor:
    """Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)') + Linear weight (D, p·p·c) -> conv (D, c, p, p)."""
    return w.reshape(w.shape[0], patch, patch, in_chans).permute(0, 3, 1, 2)


def reference_mixture(v: torch.Tensor) -> torch.Tensor:
    """The reference's mixture parameter (K, heads, 1, 1) -> ours (heads, K)."""
    return v.reshape(v.shape[0], -1).t()


def is_fixed_table(key: str) -> bool:
    """The reference's stored copies of the fixed distance table (``mask``, ``….mask.mask``)."""
    return key == "mask" or key.endswith(".mask")


# the lucidrains-style hosts' (ViT, CaiT, PiT) stem and head
LUCIDRAINS_STEM_HEAD_RULES = (
    (r"pos_embedding", r"pos_embed"),
    (r"cls_token", r"cls_token"),
    (r"mlp_head\.0\.(weight|bias)", r"fc_norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
)


def prenorm_pair_rules(src: str, dst: str, wrap: str = "") -> Tuple[Tuple[str, str], ...]:
    """Rules for the lucidrains-style layer ``[PreNorm(Attention), PreNorm(FeedForward)]`` at ``src``
    (a regex whose groups ``dst`` refers to) -> our block at ``dst``. ``wrap`` is the path of the
    PreNorm inside an outer wrapper (CaiT's LayerScale: ``'fn.'``)."""
    g = re.compile(src).groups + 1  # the group after src's own
    attn, ff = rf"{src}\.0\.{re.escape(wrap)}", rf"{src}\.1\.{re.escape(wrap)}"
    return (
        (rf"{attn}norm\.(weight|bias)", rf"{dst}.norm1.\{g}"),
        (rf"{attn}fn\.to_qkv\.weight", rf"{dst}.attn.qkv.weight"),
        (rf"{attn}fn\.to_out\.0\.(weight|bias)", rf"{dst}.attn.proj.\{g}"),
        (rf"{attn}fn\.mask\.(alpha|sigma)", rf"{dst}.attn.gmm.\{g}"),
        (rf"{ff}norm\.(weight|bias)", rf"{dst}.norm2.\{g}"),
        (rf"{ff}fn\.net\.0\.(weight|bias)", rf"{dst}.mlp.fc1.\{g}"),
        (rf"{ff}fn\.net\.3\.(weight|bias)", rf"{dst}.mlp.fc2.\{g}"),
    )


def rename_reference(sd: Dict[str, torch.Tensor], rules: Sequence[Tuple[str, str]], drop: Sequence[str],
                     host: str) -> Dict[str, torch.Tensor]:
    """Map a reference state dict by regex ``rules`` (first match wins; mixture parameters are
    transposed to (heads, K)); keys matching a ``drop`` pattern (fixed tables, unused modules) go.
    Any other key is an error naming it, so a layout we do not know never loads half-way."""
    out = {}
    for k, v in sd.items():
        if is_fixed_table(k) or any(re.fullmatch(p, k) for p in drop):
            continue
        for pat, repl in rules:
            new, n = re.subn(f"^{pat}$", repl, k)
            if n:
                break
        else:
            raise KeyError(f"checkpoint_filter_fn: unexpected key {k!r} for the reference {host} layout")
        if new.endswith((".gmm.alpha", ".gmm.sigma")):
            v = reference_mixture(v)
        out[new] = v
    return out
