# SPDX-License-Identifier: Apache-2.0
# Derived from ysj9909/FFNet (Apache-2.0; the FFNet authors (Seokju Yun, Dongheon Lee, Youngmin Ro)); see THIRD_PARTY_NOTICES.md
"""FFNet and the MetaMixer block.

"FFNet: MetaMixer-based Efficient Convolutional Mixer Design" (first titled "MetaMixer Is All You
Need"), Yun, Lee, Ro, arXiv:2406.02021. Upstream: https://github.com/ysj9909/FFNet (Apache-2.0).

The paper reads both self-attention and the FFN as a query-key-value mixer and argues that this
framework, not the particular sub-operations, is what matters. :class:`MetaMixer` is that framework
with pluggable sub-operations:

- FFNified attention (FFNet's token mixer): query = 1x1 Conv-BN, key = depthwise conv,
  activation = GELU, value = depthwise conv;
- the FFN / channel mixer: query = depthwise conv, key = 1x1 conv (expand), GELU, value = 1x1 conv;
- self-attention: query/key/value = 1x1 projections, activation = softmax, run by
  ``zoo.kernels.attention``, so attention and FFNified attention can be swapped per stage with
  ``token_mixers=('conv', 'conv', 'conv', 'attn')`` to explore the paper's hybrid.

Training-time branches (Conv-BN, RepVGG-style 7x7 + 3x3 depthwise, BN-1x1 + skip) fold into plain
convs with ``model.reparameterize()`` or ``timm.utils.reparameterize_model(model)``; the released
parameter counts are for the fused network. Released checkpoints are unfused and load through
:func:`checkpoint_filter_fn`.
"""
import re
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale2d, SEModule, get_act_layer, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.errors import NotScriptable
from zoo.hub import cfg as hub_cfg
from zoo.kernels import attention
from zoo.models._builder import build_model
from zoo.layers.inplace import gelu_approximate, gelu_fresh, residual_fresh
from zoo.layers.reparam import BnConvSkip, ConvBn, RepDwConv, reparameterize_modules

__all__ = ['MetaMixer', 'FFBlock', 'FFNet', 'ffnified_attention', 'conv_ffn', 'conv_self_attention']


def _gelu_mode(act: nn.Module, producer: nn.Module) -> Optional[str]:
    """GELU flavour of ``act`` ('none' / 'tanh') when it may run in place on ``producer``'s output,
    else None. Only conv / Conv-BN / RepVGG producers qualify: their output is a fresh buffer that
    nothing else holds."""
    if not isinstance(producer, (nn.Conv2d, ConvBn, RepDwConv)):
        return None
    return gelu_approximate(act)


# a leaf for any torch.fx tracer, not only timm's (it branches on runtime autograd state)
torch.fx.wrap('gelu_fresh')


class MetaMixer(nn.Module):
    """Query-key-value mixer with free sub-operations: ``proj(interact(query(x), x))``.

    Two kinds of memory:

    - static (``act`` is an activation: a module, class or name such as ``'gelu'``): the keys and
      values are the parameters of ``key`` and ``value`` (convs or linears), so the interaction is
      ``value(act(key(q)))`` — the FFN and FFNet's FFNified attention;
    - dynamic (``act='softmax'``): ``key`` and ``value`` project the input tokens and the
      key-softmax-value interaction is one ``zoo.kernels.attention`` call (dense, ``num_heads``
      heads, ``scale`` default head_dim**-0.5) — self-attention.

    ``token_layout`` says how a dynamic mixer sees its input: ``'nchw'`` maps (every pixel is a
    token, row-major) or ``'nlc'`` token sequences. Static mixers do not care.
    """

    def __init__(
            self,
            query: Optional[nn.Module],
            key: nn.Module,
            value: nn.Module,
            act: Union[str, nn.Module, Callable, None] = 'gelu',
            proj: Optional[nn.Module] = None,
            num_heads: int = 1,
            scale: Optional[float] = None,
            token_layout: str = 'nchw',
    ):
        super().__init__()
        self.dynamic = isinstance(act, str) and act.lower() == 'softmax'
        if token_layout not in ('nchw', 'nlc'):
            raise ValueError(f"MetaMixer token_layout must be 'nchw' or 'nlc', got {token_layout!r}")
        if num_heads < 1:
            raise ValueError(f'MetaMixer num_heads must be >= 1, got {num_heads}')
        self.query = query if query is not None else nn.Identity()
        self.key = key
        if self.dynamic:
            self.act = nn.Identity()  # softmax is part of the attention kernel
        elif isinstance(act, nn.Module):
            self.act = act
        elif act is None:
            self.act = nn.Identity()
        else:
            self.act = get_act_layer(act)()
        self.value = value
        self.proj = proj if proj is not None else nn.Identity()
        self.num_heads = num_heads
        self.scale = scale
        self.token_layout = token_layout

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense multi-head softmax attention between the tokens of q and those of k / v: NCHW
        maps (every pixel a token, row-major) or (B, N, C) sequences, as ``token_layout`` says."""
        h = self.num_heads
        if self.token_layout == 'nchw':
            B, C, H, W = q.shape
            Cv = v.shape[1]
            q = q.reshape(B, h, C // h, H * W).transpose(-1, -2)
            k = k.reshape(B, h, C // h, -1).transpose(-1, -2)
            v = v.reshape(B, h, Cv // h, -1).transpose(-1, -2)
            out = attention(q, k, v, scale=self.scale)  # (B, heads, HW, Dv)
            return out.transpose(-1, -2).reshape(B, Cv, H, W)
        B, N, C = q.shape
        Cv = v.shape[-1]
        q = q.reshape(B, N, h, C // h).transpose(1, 2)
        k = k.reshape(B, k.shape[1], h, C // h).transpose(1, 2)
        v = v.reshape(B, v.shape[1], h, Cv // h).transpose(1, 2)
        return attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, Cv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            out = self._attend(self.query(x), self.key(x), self.value(x))
        else:
            # no intermediate outlives its consumer (a held query map raised peak memory)
            gelu = _gelu_mode(self.act, self.key)
            h = self.key(self.query(x))
            h = self.act(h) if gelu is None else gelu_fresh(h, gelu)
            out = self.value(h)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"memory={'dynamic (softmax attention)' if self.dynamic else 'static'}, num_heads={self.num_heads}"


def _depthwise(dim: int, kernel_size: int, bn: bool) -> nn.Module:
    """FFNet's depthwise conv: RepVGG 7x7+3x3 (any k > 3) or a plain k x k (Conv-BN or biased conv)."""
    if kernel_size > 3:
        return RepDwConv(dim, dim, kernel_size)
    if bn:
        return ConvBn(dim, dim, kernel_size, groups=dim)
    return nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)


def ffnified_attention(
        dim: int,
        key_kernel_size: int = 7,
        value_kernel_size: Optional[int] = None,
        act_layer: Union[str, Callable] = 'gelu',
) -> MetaMixer:
    """FFNet token mixer: DW_v(act(DW_k(Conv-BN 1x1(x)))), no output projection."""
    value_kernel_size = key_kernel_size if value_kernel_size is None else value_kernel_size
    return MetaMixer(
        query=ConvBn(dim, dim, 1),
        key=_depthwise(dim, key_kernel_size, bn=False),
        value=_depthwise(dim, value_kernel_size, bn=False),
        act=act_layer,
    )


def conv_ffn(
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 3.0,
        act_layer: Union[str, Callable] = 'gelu',
) -> MetaMixer:
    """FFNet channel mixer (ConvNeXt-like): 1x1(act(1x1_expand(DW(x))))."""
    hidden = int(dim * mlp_ratio)
    return MetaMixer(
        query=_depthwise(dim, kernel_size, bn=True),
        key=nn.Conv2d(dim, hidden, 1),
        value=nn.Conv2d(hidden, dim, 1),
        act=act_layer,
    )


def conv_self_attention(dim: int, head_dim: int = 32, qkv_bias: bool = True) -> MetaMixer:
    """Self-attention over the pixels of a map with 1x1 q/k/v/out projections (dynamic memory)."""
    if dim % head_dim:
        raise ValueError(f'conv_self_attention: dim ({dim}) must be a multiple of head_dim ({head_dim})')
    return MetaMixer(
        query=nn.Conv2d(dim, dim, 1, bias=qkv_bias),
        key=nn.Conv2d(dim, dim, 1, bias=qkv_bias),
        value=nn.Conv2d(dim, dim, 1, bias=qkv_bias),
        act='softmax',
        proj=nn.Conv2d(dim, dim, 1),
        num_heads=dim // head_dim,
    )


class FFBlock(nn.Module):
    """Two residual MetaMixers: token mixing (then optional SE) and channel mixing."""

    def __init__(
            self,
            dim: int,
            token_mixer: nn.Module,
            channel_mixer: nn.Module,
            drop_path: float = 0.,
            layer_scale_init_value: Optional[float] = None,
            use_se: bool = False,
    ):
        super().__init__()
        self.token_mixer = token_mixer
        self.ls1 = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # upstream applies SE to the token-mixer residual sum
        self.se = SEModule(dim, rd_ratio=0.25) if use_se else nn.Identity()
        self.channel_mixer = channel_mixer
        self.ls2 = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.drop_path1(self.ls1(self.token_mixer(x)))
        x = self.se(residual_fresh(branch, x, self.token_mixer, self.ls1, self.drop_path1))
        branch = self.drop_path2(self.ls2(self.channel_mixer(x)))
        return residual_fresh(branch, x, self.channel_mixer, self.ls2, self.drop_path2)


class Stem(nn.Sequential):
    """conv, act, conv (upstream's patch_embed); a Sequential so the keys stay ``stem.0`` / ``stem.2``.
    A GELU may run in place on the first conv's output (see :func:`zoo.layers.inplace.gelu_fresh`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        gelu = _gelu_mode(self[1], self[0])
        return self[2](self[1](x) if gelu is None else gelu_fresh(x, gelu))


class Downsample(nn.Module):
    """FFNet patch merging: stride-2 RepVGG depthwise 7x7 with channel multiplier, then x + 1x1(BN(x))."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 7):
        super().__init__()
        self.dw = RepDwConv(in_chs, out_chs, kernel_size, stride=2)
        self.pw = BnConvSkip(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class FFNetStage(nn.Module):
    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            downsample: bool,
            token_mixer_fn: Callable[[int], nn.Module],
            channel_mixer_fn: Callable[[int], nn.Module],
            drop_path_rates: Sequence[float],
            layer_scale_init_value: Optional[float] = None,
            use_se: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, out_chs) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            FFBlock(
                out_chs,
                token_mixer_fn(out_chs),
                channel_mixer_fn(out_chs),
                drop_path=drop_path_rates[i],
                layer_scale_init_value=layer_scale_init_value,
                use_se=use_se and i % 2 == 0,  # upstream: SE on every other block
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


def _per_stage(value, num_stages: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f'{name} needs {num_stages} entries (one per stage), got {len(value)}: {value!r}')
        return tuple(value)
    return (value,) * num_stages


class FFNet(NotScriptable, nn.Module):
    """FFNet: conv stem, four stages of FFBlocks (MetaMixer token + channel mixers), BN, pool, linear.

    Args mirror upstream's: ``key_kernel_sizes`` / ``value_kernel_sizes`` are the token mixer's
    depthwise kernels (upstream ``kernel_sizes1/2``), ``mlp_kernel_sizes`` the channel mixer's
    (upstream ``kernel_sizes``); kernels > 3 get a parallel small branch (RepVGG style).
    ``token_mixers`` picks per stage 'conv' (FFNified attention) or 'attn' (dense self-attention
    through zoo.kernels, ``head_dim`` channels per head).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (2, 2, 8, 2),
            dims: Sequence[int] = (80, 160, 320, 640),
            stem_dim: int = 64,
            key_kernel_sizes: Union[int, Sequence[int]] = (3, 3, 7, 7),
            value_kernel_sizes: Union[int, Sequence[int], None] = None,
            mlp_kernel_sizes: Union[int, Sequence[int]] = 3,
            mlp_ratios: Union[float, Sequence[float]] = 3.0,
            token_mixers: Union[str, Sequence[str]] = 'conv',
            head_dim: int = 32,
            use_se: Union[bool, Sequence[bool]] = False,
            layer_scale_init_value: Optional[float] = None,
            act_layer: Union[str, Callable] = 'gelu',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(dims) != num_stages:
            raise ValueError(f'FFNet: depths ({len(depths)} stages) and dims ({len(dims)}) must have the same length')
        key_ks = _per_stage(key_kernel_sizes, num_stages, 'key_kernel_sizes')
        value_ks = key_ks if value_kernel_sizes is None else _per_stage(
            value_kernel_sizes, num_stages, 'value_kernel_sizes')
        mlp_ks = _per_stage(mlp_kernel_sizes, num_stages, 'mlp_kernel_sizes')
        mlp_ratios = _per_stage(mlp_ratios, num_stages, 'mlp_ratios')
        token_mixers = _per_stage(token_mixers, num_stages, 'token_mixers')
        use_se = _per_stage(use_se, num_stages, 'use_se')
        for tm in token_mixers:
            if tm not in ('conv', 'attn'):
                raise ValueError(f"FFNet token_mixers entries must be 'conv' or 'attn', got {tm!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_stages = num_stages

        act = get_act_layer(act_layer)
        self.stem = Stem(
            ConvBn(in_chans, stem_dim, 3, stride=2, padding=1),
            act(),
            ConvBn(stem_dim, dims[0], 3, stride=2, padding=1),
        )

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))
        dpr = [d.tolist() for d in dpr]
        stages = []
        self.feature_info = []
        prev_dim = dims[0]
        reduction = 4
        for i in range(num_stages):
            if token_mixers[i] == 'attn':
                token_fn = partial(conv_self_attention, head_dim=head_dim)
            else:
                token_fn = partial(
                    ffnified_attention, key_kernel_size=key_ks[i], value_kernel_size=value_ks[i], act_layer=act)
            channel_fn = partial(conv_ffn, kernel_size=mlp_ks[i], mlp_ratio=mlp_ratios[i], act_layer=act)
            if i > 0:
                reduction *= 2
            stages.append(FFNetStage(
                prev_dim,
                dims[i],
                depth=depths[i],
                downsample=i > 0,
                token_mixer_fn=token_fn,
                channel_mixer_fn=channel_fn,
                drop_path_rates=dpr[i],
                layer_scale_init_value=layer_scale_init_value,
                use_se=use_se[i],
            ))
            prev_dim = dims[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

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
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    @torch.no_grad()
    def reparameterize(self) -> 'FFNet':
        """Fold every Conv-BN, BN-Conv(+skip) and RepVGG branch into single convs, in place.

        Uses BatchNorm running statistics, so it is an inference-time transform (equivalent in eval
        mode). Idempotent; returns self.
        """
        reparameterize_modules(self)
        return self

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at ``indices`` (``norm`` applies the final BN to the last stage's output)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"FFNet.forward_intermediates supports output_fmt='NCHW' only, got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1

        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop stages after the last wanted intermediate (and the norm / head when asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < self.num_stages - 1:
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.head.reset(self.num_classes, in_features=self.num_features)
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# upstream module path -> zoo module path, applied in order to the part after the stage/block index
_BLOCK_RENAMES = (
    (r'^token_mixer\.0\.layer_scale$', 'ls1.gamma'),
    (r'^channel_mixer\.layer_scale$', 'ls2.gamma'),
    (r'^token_mixer\.0\.main\.fc\.', 'token_mixer.query.'),
    (r'^token_mixer\.0\.main\.conv1\.', 'token_mixer.key.'),
    (r'^token_mixer\.0\.main\.conv2\.', 'token_mixer.value.'),
    (r'^token_mixer\.1\.', 'se.'),
    (r'^channel_mixer\.main\.conv\.', 'channel_mixer.query.'),
    (r'^channel_mixer\.main\.fc1\.', 'channel_mixer.key.'),
    (r'^channel_mixer\.main\.fc2\.', 'channel_mixer.value.'),
)


def _rename_conv_parts(key: str) -> str:
    # upstream Conv2d_BN children are c/bn; RepVGGDW branches are conv (k x k) and conv1 (small)
    key = re.sub(r'\.conv\.(c|bn)\.', r'.conv_kxk.\1.', key)
    key = re.sub(r'\.conv1\.(c|bn)\.', r'.conv_small.\1.', key)
    return re.sub(r'\.c\.(weight|bias)$', r'.conv.\1', key)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: FFNet) -> Dict[str, torch.Tensor]:
    """Map an upstream (ysj9909/FFNet, unfused) checkpoint onto this module layout.

    Accepts the raw file dict (weights under ``state_dict`` or ``model``), optional ``module.``
    prefixes, and state dicts already in zoo layout (returned unchanged).
    """
    for wrapper in ('state_dict', 'model'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {(k[7:] if k.startswith('module.') else k): v for k, v in state_dict.items()}
    if not any(k.startswith('patch_embed.') for k in state_dict):
        return state_dict

    out = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed.'):
            k = _rename_conv_parts('stem.' + k[len('patch_embed.'):])
        elif k.startswith('stages.'):
            _, stage, idx, rest = k.split('.', 3)
            stage, idx = int(stage), int(idx)
            if stage > 0 and idx == 0:
                # PatchMerging: proj.0 = RepVGGDW, proj.1 = Conv2d_BN_skip(BN_Conv2d)
                rest = re.sub(r'^proj\.0\.', 'dw.', rest)
                rest = re.sub(r'^proj\.1\.conv\.', 'pw.', rest)
                rest = re.sub(r'^pw\.c\.weight$', 'pw.conv.weight', rest)
                k = _rename_conv_parts(f'stages.{stage}.downsample.{rest}')
            else:
                block = idx - 1 if stage > 0 else idx
                for pattern, repl in _BLOCK_RENAMES:
                    rest = re.sub(pattern, repl, rest)
                if rest.endswith('gamma'):
                    v = v.reshape(-1)  # upstream (C, 1, 1) -> LayerScale2d (C,)
                k = _rename_conv_parts(f'stages.{stage}.blocks.{block}.{rest}')
        elif k.startswith('head.'):
            k = 'head.fc.' + k[len('head.'):]
        out[k] = v
    return out


def _create_ffnet(variant: str, pretrained: bool = False, **kwargs) -> FFNet:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    feature_cfg = dict(flatten_sequential=True, out_indices=out_indices)
    feature_cfg.update(kwargs.pop('feature_cfg', None) or {})
    return build_model(
        FFNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


_RELEASE = 'https://github.com/ysj9909/FFNet/releases/download/v1.0/'


def _cfg(file: str = '', res: int = 256, crop_pct: float = 0.9, **kwargs) -> Dict:
    return hub_cfg(
        url=_RELEASE + file if file else '',
        sha256=None,
        license='apache-2.0',
        paper_ids='arXiv:2406.02021',
        paper_name='FFNet: MetaMixer-based Efficient Convolutional Mixer Design',
        origin_url='https://github.com/ysj9909/FFNet',
        num_classes=1000,
        input_size=(3, res, res),
        pool_size=(res // 32, res // 32),
        crop_pct=crop_pct,
        crop_mode='center',
        interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv='stem.0.conv',
        classifier='head.fc',
        **kwargs,
    )


# eval crops follow upstream train.py: model cfg crop_pct at 256, 1.0 after the 384 fine-tune
default_cfgs = generate_default_cfgs({
    'ffnet_1.in1k_256': _cfg('ffnet_1.pth.tar', crop_pct=0.9),
    'ffnet_1.dist_in1k_256': _cfg('ffnet_1_distillation.pth.tar', crop_pct=0.9),
    'ffnet_2.in1k_256': _cfg('ffnet_2.pth.tar', crop_pct=0.9),
    'ffnet_2.dist_in1k_256': _cfg('ffnet_2_distillation.pth.tar', crop_pct=0.9),
    'ffnet_3.in1k_256': _cfg('ffnet_3.pth.tar', crop_pct=0.95),
    'ffnet_3.dist_in1k_256': _cfg('ffnet_3_distillation.pth.tar', crop_pct=0.95),
    'ffnet_3.in1k_384': _cfg('ffnet_3_384.pth.tar', res=384, crop_pct=1.0),
    'ffnet_4.in1k_384': _cfg('ffnet_4_384.pth.tar', res=384, crop_pct=1.0),
})


@register_model
def ffnet_1(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-1: 13.66 M params fused (upstream recipe drop_path_rate 0.1)."""
    model_args = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), mlp_kernel_sizes=3)
    return _create_ffnet('ffnet_1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ffnet_2(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-2: 26.91 M params fused (upstream recipe drop_path_rate 0.15)."""
    model_args = dict(depths=(3, 3, 15, 3), dims=(88, 176, 352, 704), mlp_kernel_sizes=7)
    return _create_ffnet('ffnet_2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ffnet_3(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-3: 48.33 M params fused, layer scale 1e-6 (upstream recipe drop_path_rate 0.35)."""
    model_args = dict(
        depths=(4, 4, 22, 5), dims=(96, 192, 384, 768), mlp_kernel_sizes=7, layer_scale_init_value=1e-6)
    return _create_ffnet('ffnet_3', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ffnet_4(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-4: 79.20 M params fused, layer scale 1e-6 (upstream recipe drop_path_rate 0.4)."""
    model_args = dict(
        depths=(4, 4, 27, 3), dims=(128, 256, 512, 1024), mlp_kernel_sizes=7, layer_scale_init_value=1e-6)
    return _create_ffnet('ffnet_4', pretrained=pretrained, **dict(model_args, **kwargs))
