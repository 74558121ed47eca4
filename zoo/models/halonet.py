# SPDX-License-Identifier: Apache-2.0
# Derived from huggingface/pytorch-image-models (Apache-2.0; Copyright 2025 Ross Wightman); see THIRD_PARTY_NOTICES.md
"""HaloNet: blocked local self-attention backbones on the zoo's attention op.

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones`
(Vaswani et al., CVPR 2021, https://arxiv.org/abs/2103.12731).

Two groups of models, all built on timm's Bring-Your-Own-Blocks network (``ByobNet``) with the
attention layers of :mod:`zoo.layers.halo_attention` plugged in through ByobNet's self-attention
hook, the same way timm's byoanet plugs in its own ``HaloAttn`` / ``BottleneckAttn``:

* ``halonet_h0`` … ``halonet_h7`` (``halonet_h1_zoo`` for H1, which timm also defines): the
  paper's pure-attention family. Stage i has q/k width ``w_i = 64 * 2^i``, value width
  ``rv * w_i`` and block output ``rb * w_i``. timm's block ties the value width to the q/k width,
  which cannot express rv != 1 (H5–H7), so these use :class:`HaloBottleneckBlock`.
* ``*_zoo`` re-builds of timm's trained hybrids (halonet26t, sehalonet33ts, halonet50ts,
  eca_halonext26ts, haloregnetz_b, halo2botnet50ts_256). Parameter names and shapes equal
  timm's, so timm's released checkpoints load unchanged and give timm's logits at the sizes timm
  accepts; unlike timm, any input size works (halo maps are padded to the block multiple, padded
  keys masked, outputs cropped).
"""
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, DropPath, make_divisible
from timm.models import generate_default_cfgs, register_model
from timm.models.byobnet import (
    BottleneckBlock, ByoBlockCfg, ByoModelCfg, ByobNet, LayerFn, SelfAttnBlock, create_shortcut, interleave_blocks)

from zoo import hub
from zoo.models._builder import build_model
from zoo.layers.halo_attention import BottleneckRelPosAttention, HaloAttention
from zoo.layers.inplace import FreshConvNormAct, norm_act_fresh, residual_fresh

__all__ = ['HaloBottleneckBlock', 'checkpoint_filter_fn']


class HaloBottleneckBlock(nn.Module):
    """Bottleneck whose attention value width is set on its own (the paper's rv).

    1x1 conv (in -> mid) -> self-attention (mid -> value_ratio * mid, q/k width mid) -> norm+act
    -> 1x1 conv (-> out) -> drop-path + shortcut -> act. With ``value_ratio=1`` it is timm's
    ``SelfAttnBlock`` (same module names, so timm's ``halonet_h1`` weights load).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: Tuple[int, int] = (1, 1),
            bottle_ratio: float = 1.,
            group_size: Optional[int] = None,
            downsample: str = 'conv1x1',
            value_ratio: float = 1.,
            linear_out: bool = False,
            feat_size: Optional[Tuple[int, int]] = None,
            layers: LayerFn = None,
            drop_block=None,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if layers is None or layers.self_attn is None:
            raise ValueError('HaloBottleneckBlock needs layers.self_attn (set self_attn_layer in the model cfg)')
        if dilation[0] != 1 or dilation[1] != 1:
            raise ValueError('HaloBottleneckBlock does not support dilation (output_stride < 32)')
        mid_chs = make_divisible(out_chs * bottle_ratio)
        attn_chs = make_divisible(mid_chs * value_ratio)
        self.shortcut = create_shortcut(
            downsample, in_chs, out_chs, stride=stride, dilation=dilation, apply_act=False, layers=layers, **dd)
        self.conv1_1x1 = layers.conv_norm_act(in_chs, mid_chs, 1, **dd)
        self.conv2_kxk = nn.Identity()
        # q/k stay mid wide while values (and the attention output) are attn_chs wide
        self.self_attn = layers.self_attn(mid_chs, dim_out=attn_chs, qk_ratio=mid_chs / attn_chs, stride=stride, **dd)
        self.post_attn = layers.norm_act(attn_chs, **dd)
        self.conv3_1x1 = layers.conv_norm_act(attn_chs, out_chs, 1, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()
        self.act = nn.Identity() if linear_out else layers.act(inplace=True)

    def init_weights(self, zero_init_last: bool = False):
        if zero_init_last and self.shortcut is not None and getattr(self.conv3_1x1.bn, 'weight', None) is not None:
            nn.init.zeros_(self.conv3_1x1.bn.weight)
        if hasattr(self.self_attn, 'reset_parameters'):
            self.self_attn.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _self_attn_block_forward(self, x)


# Inference on fresh buffers. In eval mode without autograd, each conv's norm+act and each block's
# residual add run in place on buffers the block just created, instead of allocating new ones (on
# CPU a fresh activation of a 64x64 stage at batch 16 is 67 MB of newly faulted pages). The same
# kernels in the same order: outputs are bitwise equal to the out-of-place path. timm's blocks
# are swapped for these subclasses by class; they add no state, so names, checkpoints and
# training are unchanged. Outputs a forward hook has seen are left alone.
def _self_attn_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1 -> conv2 -> self-attention -> norm+act -> conv3 -> drop-path + shortcut -> act."""
    shortcut = x
    x = block.conv1_1x1(x)
    x = block.conv2_kxk(x)
    x = block.self_attn(x)
    x = norm_act_fresh(block.post_attn, x, block.self_attn)
    x = block.conv3_1x1(x)
    x = block.drop_path(x)
    if block.shortcut is not None:
        x = residual_fresh(x, block.shortcut(shortcut), block.conv3_1x1, block.drop_path)
    return block.act(x)


class _FreshBottleneckBlock(BottleneckBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1_1x1(x)
        x = self.conv2_kxk(x)
        x = self.conv2b_kxk(x)
        x = self.attn(x)
        x = self.conv3_1x1(x)
        x = self.attn_last(x)
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = residual_fresh(x, self.shortcut(shortcut), self.conv3_1x1, self.attn_last, self.drop_path)
        return self.act(x)


class _FreshSelfAttnBlock(SelfAttnBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _self_attn_block_forward(self, x)


_FRESH = {ConvNormAct: FreshConvNormAct, BottleneckBlock: _FreshBottleneckBlock, SelfAttnBlock: _FreshSelfAttnBlock}


def _use_fresh_buffers(model: nn.Module) -> nn.Module:
    for m in model.modules():
        cls = _FRESH.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return model


def _paper_cfg(
        block_size: int,
        halo_size: int,
        rv: float,
        rb: float,
        l3: int,
        df: int = 0,
        num_heads: int = 8,
) -> ByoModelCfg:
    """HaloNet-H* from the paper's (b, h, rv, rb, l3, df): ResNet 7x7 stem + max-pool, halo
    bottlenecks in all four stages (depths 3, 3, l3, 3), strided attention to downsample."""
    blocks = []
    for i, d in enumerate((3, 3, l3, 3)):
        w = 64 * 2 ** i
        out = int(round(rb * w))
        blocks.append(ByoBlockCfg(
            type=partial(HaloBottleneckBlock), d=d, c=out, s=1 if i == 0 else 2, gs=0, br=w / out))
    return ByoModelCfg(
        blocks=tuple(blocks),
        stem_chs=64,
        stem_type='7x7',
        stem_pool='maxpool',
        num_features=df,
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=block_size, halo_size=halo_size, num_heads=num_heads),
        block_kwargs=dict(value_ratio=rv),
    )


_HALO, _BOT = HaloAttention, BottleneckRelPosAttention

model_cfgs = dict(
    # paper family: (b, h, rv, rb, l3, df)
    halonet_h0=_paper_cfg(8, 3, 1.0, 0.5, 7),
    halonet_h1=_paper_cfg(8, 3, 1.0, 1.0, 10),
    halonet_h2=_paper_cfg(8, 3, 1.0, 1.25, 11),
    halonet_h3=_paper_cfg(10, 3, 1.0, 1.5, 12, 1024),
    halonet_h4=_paper_cfg(12, 2, 1.0, 3.0, 12, 1280),
    halonet_h5=_paper_cfg(14, 2, 2.5, 2.0, 23, 1536),
    halonet_h6=_paper_cfg(8, 4, 3.0, 2.75, 24, 1536),
    halonet_h7=_paper_cfg(10, 3, 4.0, 3.5, 26, 2048),

    # timm's hybrids (timm/models/byoanet.py), with the zoo's layers
    halonet26t=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type='bottle', d=2, c=256, s=1, gs=0, br=0.25),
            ByoBlockCfg(type='bottle', d=2, c=512, s=2, gs=0, br=0.25),
            interleave_blocks(types=('bottle', 'self_attn'), d=2, c=1024, s=2, gs=0, br=0.25),
            ByoBlockCfg(type='self_attn', d=2, c=2048, s=2, gs=0, br=0.25),
        ),
        stem_chs=64,
        stem_type='tiered',
        stem_pool='maxpool',
        self_attn_layer=_HALO,
        self_attn_kwargs=dict(block_size=8, halo_size=2),
    ),
    sehalonet33ts=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type='bottle', d=2, c=256, s=1, gs=0, br=0.25),
            interleave_blocks(types=('bottle', 'self_attn'), every=[2], d=3, c=512, s=2, gs=0, br=0.25),
            interleave_blocks(types=('bottle', 'self_attn'), every=[2], d=3, c=1024, s=2, gs=0, br=0.25),
            ByoBlockCfg('self_attn', d=2, c=1536, s=2, gs=0, br=0.333),
        ),
        stem_chs=64,
        stem_type='tiered',
        stem_pool='',
        act_layer='silu',
        num_features=1280,
        attn_layer='se',
        self_attn_layer=_HALO,
        self_attn_kwargs=dict(block_size=8, halo_size=3),
    ),
    halonet50ts=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type='bottle', d=3, c=256, s=1, gs=0, br=0.25),
            interleave_blocks(
                types=('bottle', 'self_attn'), every=4, d=4, c=512, s=2, gs=0, br=0.25,
                self_attn_layer=_HALO, self_attn_kwargs=dict(block_size=8, halo_size=3, num_heads=4)),
            interleave_blocks(types=('bottle', 'self_attn'), d=6, c=1024, s=2, gs=0, br=0.25),
            interleave_blocks(types=('bottle', 'self_attn'), d=3, c=2048, s=2, gs=0, br=0.25),
        ),
        stem_chs=64,
        stem_type='tiered',
        stem_pool='maxpool',
        act_layer='silu',
        self_attn_layer=_HALO,
        self_attn_kwargs=dict(block_size=8, halo_size=3),
    ),
    eca_halonext26ts=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type='bottle', d=2, c=256, s=1, gs=16, br=0.25),
            ByoBlockCfg(type='bottle', d=2, c=512, s=2, gs=16, br=0.25),
            interleave_blocks(types=('bottle', 'self_attn'), d=2, c=1024, s=2, gs=16, br=0.25),
            ByoBlockCfg(type='self_attn', d=2, c=2048, s=2, gs=16, br=0.25),
        ),
        stem_chs=64,
        stem_type='tiered',
        stem_pool='maxpool',
        act_layer='silu',
        attn_layer='eca',
        self_attn_layer=_HALO,
        self_attn_kwargs=dict(block_size=8, halo_size=2, dim_head=16),
    ),
    haloregnetz_b=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type='bottle', d=2, c=48, s=2, gs=16, br=3),
            ByoBlockCfg(type='bottle', d=6, c=96, s=2, gs=16, br=3),
            interleave_blocks(types=('bottle', 'self_attn'), every=3, d=12, c=192, s=2, gs=16, br=3),
            ByoBlockCfg('self_attn', d=2, c=288, s=2, gs=16, br=3),
        ),
        stem_chs=32,
        stem_pool='',
        downsample='',
        num_features=1536,
        act_layer='silu',
        attn_layer='se',
        attn_kwargs=dict(rd_ratio=0.25),
        block_kwargs=dict(bottle_in=True, linear_out=True),
        self_attn_layer=_HALO,
        self_attn_kwargs=dict(block_size=7, halo_size=2, qk_ratio=0.33),
    ),
    halo2botnet50ts=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type='bottle', d=3, c=256, s=1, gs=0, br=0.25),
            interleave_blocks(
                types=('bottle', 'self_attn'), d=4, c=512, s=2, gs=0, br=0.25,
                self_attn_layer=_HALO, self_attn_kwargs=dict(halo_size=3)),
            interleave_blocks(
                types=('bottle', 'self_attn'), d=6, c=1024, s=2, gs=0, br=0.25,
                self_attn_layer=_HALO, self_attn_kwargs=dict(halo_size=3)),
            interleave_blocks(
                types=('bottle', 'self_attn'), d=3, c=2048, s=2, gs=0, br=0.25,
                self_attn_layer=_BOT, self_attn_kwargs=dict()),
        ),
        stem_chs=64,
        stem_type='tiered',
        stem_pool='',
        act_layer='silu',
    ),
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept timm byoanet checkpoints (and zoo ones) for a zoo HaloNet.

    The zoo layers keep timm's parameter layout — ``q`` head-major, ``kv`` interleaved per head
    as [k_h0, v_h0, k_h1, v_h1, ...], BoTNet ``qkv`` as [q | k | v] — so tensors pass through
    unchanged; this unwraps training checkpoints (``state_dict`` / ``model`` / ``state_dict_ema``
    entries, ``module.`` prefixes) and checks every attention tensor's shape so a checkpoint for
    a different block/halo/head setting fails with a clear message rather than a silent mismatch.
    """
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.startswith('module.'):
            k = k[len('module.'):]
        if '.self_attn.' in k and k in own and own[k].shape != v.shape:
            raise ValueError(
                f'checkpoint tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)} '
                '(different block/halo size, heads or widths?)')
        out[k] = v
    return out


def _create_halonet(variant: str, cfg_variant: Optional[str] = None, pretrained: bool = False, **kwargs) -> ByobNet:
    cfg_key = cfg_variant or variant.replace('_zoo', '')
    model = build_model(
        ByobNet, variant, pretrained,
        model_cfg=model_cfgs[cfg_key],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )
    return _use_fresh_buffers(model)


_LICENSE = 'apache-2.0'
_PAPER = dict(paper_ids='arXiv:2103.12731', paper_name='Scaling Local Self-Attention for Parameter Efficient Visual Backbones')
_TIMM_RELEASE = 'https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-attn-weights/'


def _cfg(url: str = '', sha256: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    base = dict(
        num_classes=1000, input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.95, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.conv1.conv', classifier='head.fc',
        fixed_input_size=False, min_input_size=(3, 32, 32), license=_LICENSE,
    )
    base.update(_PAPER)
    base.update(kwargs)
    return hub.cfg(url=url, sha256=sha256, **base)


def _paper(size: int, **kwargs) -> Dict[str, Any]:
    # the paper's weights were never released: architecture-only cfgs at the paper's image size
    return _cfg(input_size=(3, size, size), pool_size=(size // 32, size // 32), crop_pct=0.875, **kwargs)


def _timm(name: str, tag: str, file: str, **kwargs) -> Dict[str, Any]:
    # timm's released weights: the GitHub release (its file name carries a sha256 prefix that is checked on
    # download) is preferred by zoo.hub; the HF hub copy (timm/<name>.<tag>, no hash) is the alternative
    return _cfg(
        url=_TIMM_RELEASE + file, hf_hub_id=f'timm/{name}.{tag}',
        origin_url='https://github.com/huggingface/pytorch-image-models', **kwargs)


default_cfgs = generate_default_cfgs({
    'halonet_h0.untrained': _paper(256),
    'halonet_h1_zoo.untrained': _paper(256),
    'halonet_h2.untrained': _paper(256),
    'halonet_h3.untrained': _paper(320),
    'halonet_h4.untrained': _paper(384),
    'halonet_h5.untrained': _paper(448),
    'halonet_h6.untrained': _paper(512),
    # the paper lists 600 px, which b=10 does not tile at stride 16/32; 640 does
    'halonet_h7.untrained': _paper(640),

    'halonet26t_zoo.a1h_in1k': _timm('halonet26t', 'a1h_in1k', 'halonet26t_a1h_256-3083328c.pth'),
    'sehalonet33ts_zoo.ra2_in1k': _timm(
        'sehalonet33ts', 'ra2_in1k', 'sehalonet33ts_256-87e053f9.pth', crop_pct=0.94),
    'halonet50ts_zoo.a1h_in1k': _timm(
        'halonet50ts', 'a1h_in1k', 'halonet50ts_a1h2_256-f3a3daee.pth', crop_pct=0.94),
    'eca_halonext26ts_zoo.c1_in1k': _timm(
        'eca_halonext26ts', 'c1_in1k', 'eca_halonext26ts_c_256-06906299.pth', crop_pct=0.94),
    'haloregnetz_b_zoo.ra3_in1k': _timm(
        'haloregnetz_b', 'ra3_in1k', 'haloregnetz_c_raa_256-c8ad7616.pth',
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv='stem.conv',
        input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.94),
    # BoTNet stage: position tables sized for img_size (256); any smaller input works, a larger one
    # needs the model built with a larger img_size (timm fixes the input at exactly 256)
    'halo2botnet50ts_256_zoo.a1h_in1k': _timm(
        'halo2botnet50ts_256', 'a1h_in1k', 'halo2botnet50ts_a1h2_256-fd9c11a3.pth'),
})


@register_model
def halonet_h0(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H0 (paper): b8 h3, rv 1, rb 0.5, l3 7, 256 px."""
    return _create_halonet('halonet_h0', pretrained=pretrained, **kwargs)


@register_model
def halonet_h1_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H1 (paper; same network and weight layout as timm's halonet_h1): b8 h3, rv 1, rb 1, l3 10."""
    return _create_halonet('halonet_h1_zoo', pretrained=pretrained, **kwargs)


@register_model
def halonet_h2(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H2 (paper): b8 h3, rv 1, rb 1.25, l3 11, 256 px."""
    return _create_halonet('halonet_h2', pretrained=pretrained, **kwargs)


@register_model
def halonet_h3(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H3 (paper): b10 h3, rv 1, rb 1.5, l3 12, df 1024, 320 px."""
    return _create_halonet('halonet_h3', pretrained=pretrained, **kwargs)


@register_model
def halonet_h4(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H4 (paper): b12 h2, rv 1, rb 3, l3 12, df 1280, 384 px."""
    return _create_halonet('halonet_h4', pretrained=pretrained, **kwargs)


@register_model
def halonet_h5(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H5 (paper): b14 h2, rv 2.5, rb 2, l3 23, df 1536, 448 px."""
    return _create_halonet('halonet_h5', pretrained=pretrained, **kwargs)


@register_model
def halonet_h6(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H6 (paper): b8 h4, rv 3, rb 2.75, l3 24, df 1536, 512 px."""
    return _create_halonet('halonet_h6', pretrained=pretrained, **kwargs)


@register_model
def halonet_h7(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H7 (paper): b10 h3, rv 4, rb 3.5, l3 26, df 2048, 640 px."""
    return _create_halonet('halonet_h7', pretrained=pretrained, **kwargs)


@register_model
def halonet26t_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """timm's halonet26t (ResNet-26-T, halo b8 h2 in the last two stages) on the zoo's op."""
    return _create_halonet('halonet26t_zoo', pretrained=pretrained, **kwargs)


@register_model
def sehalonet33ts_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """timm's sehalonet33ts (ResNet-33-TS, SE, SiLU, halo b8 h3 in stages 2-4) on the zoo's op."""
    return _create_halonet('sehalonet33ts_zoo', pretrained=pretrained, **kwargs)


@register_model
def halonet50ts_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """timm's halonet50ts (ResNet-50-TS, SiLU, halo b8 h3 interleaved in stages 2-4) on the zoo's op."""
    return _create_halonet('halonet50ts_zoo', pretrained=pretrained, **kwargs)


@register_model
def eca_halonext26ts_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """timm's eca_halonext26ts (ResNeXt-26-TS, ECA, SiLU, halo b8 h2, head dim 16) on the zoo's op."""
    return _create_halonet('eca_halonext26ts_zoo', pretrained=pretrained, **kwargs)


@register_model
def haloregnetz_b_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """timm's haloregnetz_b (RegNetZ-B with halo b7 h2 blocks, SE) on the zoo's op."""
    return _create_halonet('haloregnetz_b_zoo', pretrained=pretrained, **kwargs)


@register_model
def halo2botnet50ts_256_zoo(pretrained: bool = False, **kwargs) -> ByobNet:
    """timm's halo2botnet50ts_256 (halo in stages 2-3, BoTNet dense rel-pos attention in 4) on the zoo's op.

    ``img_size`` (default 256) sizes the BoTNet position tables: inputs up to it work.
    """
    kwargs.setdefault('img_size', 256)
    return _create_halonet('halo2botnet50ts_256_zoo', 'halo2botnet50ts', pretrained=pretrained, **kwargs)
