# SPDX-License-Identifier: Apache-2.0 AND BSD-2-Clause
# Derived from dbouget/mri_brain_tumor_segmentation (BSD-2-Clause; Copyright (c) 2021, dbouget); see THIRD_PARTY_NOTICES.md
"""AGUNet and DAUNet / DAGUNet: 3-D attention U-Nets for brain-tumour (meningioma) MRI segmentation.

Paper: `Meningioma segmentation in T1-weighted MRI leveraging global context and attention
mechanisms` (Bouget et al., Front. Radiol. 2021, https://arxiv.org/abs/2101.07715); upstream
Keras code: https://github.com/dbouget/mri_brain_tumor_segmentation (BSD-2, inference only).

One class, :class:`AttentionUNet3d`, builds the whole family; every concept of the paper is a flag
so that ablations are configs, not forks:

* conv block: 2 x [Conv3d 3^3 -> BN -> ReLU]; encoder max-pooling skips an axis whose size at the
  block input is <= 4 (decided at run time, so any input size works; the decoder up-samples by the
  same per-axis factors);
* ``input_pyramid``: the input is average-pooled once per level and injected by a 3^3 conv + ReLU,
  concatenated in front of the encoder features;
* ``deep_supervision``: one 1x1 head per decoder level, finest first (inference uses the finest);
* ``attention_gates`` (AGUNet): a gate on every skip connection. ``ag_mode='concat'`` is the gate
  as upstream coded it (ReLU of the *concatenated* projections, then a 1x1 conv), ``'additive'`` the
  Oktay / Attention-U-Net form (ReLU of their sum);
* ``dual_attention`` (DAUNet): position attention (PAM) and channel attention (CAM) at the
  bottleneck; ``guided`` (DAGUNet) also up-projects the attended bottleneck into every decoder level.

Keras semantics the released weights depend on are the defaults: BatchNorm eps 1e-3 (momentum
0.99, i.e. torch momentum 0.01); Conv3DTranspose ``padding='same'`` (TF pads the *end*: it equals
torch ConvTranspose3d with padding 0, cropped to ``n * stride``, see :class:`TFSameConvTranspose3d`);
PAM without 1/sqrt(d) scaling; the Keras CAM form ``X softmax(X^T X)``.

The network returns *logits* ``(B, num_classes, D1, D2, D3)`` (upstream's heads end in softmax; use
:meth:`AttentionUNet3d.predict_proba`). With ``deep_supervision`` a model in training mode returns
the list of every level's logits, finest first (:meth:`forward_all` always does).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import FeatureGetterNet, feature_take_indices

from zoo import hub
from zoo.models._builder import build_model
from zoo.errors import NoImageDataConfig, NotScriptable, UnsupportedError
from zoo.kernels import attention

__all__ = ['AttentionUNet3d', 'TFSameConvTranspose3d', 'AttentionGate3d', 'PositionAttention3d',
           'ChannelAttention3d', 'pool_factors', 'tf_same_transpose_crop', 'checkpoint_filter_fn']

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # Keras momentum 0.99 weighs the old running value; torch weighs the new one


def pool_factors(size: Sequence[int], min_size: int = 4) -> Tuple[int, ...]:
    """Upstream's rule: pool an axis by 2 unless its size at the block input is <= ``min_size``."""
    return tuple(1 if int(s) <= min_size else 2 for s in size)


def tf_same_transpose_crop(n: int, kernel: int, stride: int) -> Tuple[int, int]:
    """(start, length) of TF's 'same' transposed-conv output inside torch's padding-0 output.

    TF's transposed conv is the adjoint of a SAME conv on a length ``n * stride`` input, which pads
    ``max(kernel - stride, 0)`` in total, the smaller half first. The torch output (length
    ``(n - 1) * stride + kernel``, padded at the end by ``max(stride - kernel, 0)``) is cropped there.
    """
    pad_total = max(kernel - stride, 0)
    return pad_total // 2, n * stride


class TFSameConvTranspose3d(nn.Module):
    """Keras ``Conv3DTranspose(k, strides=s, padding='same')``: output size exactly ``n * s``.

    torch's ``ConvTranspose3d(k=3, s=2, p=1, output_padding=1)`` gives the same size but is shifted
    by one voxel against TF (TF pads after, not before). The stride is an argument of ``forward``
    because the encoder decides per input which axes it pooled; weights do not depend on it.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: Union[int, Sequence[int]] = 2,
                 bias: bool = True):
        super().__init__()
        k = kernel_size
        self.kernel_size = (k, k, k)
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else (int(stride),) * 3
        self.weight = nn.Parameter(torch.empty(in_chs, out_chs, k, k, k))
        self.bias = nn.Parameter(torch.zeros(out_chs)) if bias else None
        # torch's ConvTranspose3d initialisation, without keeping a module around
        ref = nn.ConvTranspose3d(in_chs, out_chs, k, bias=bias)
        with torch.no_grad():
            self.weight.copy_(ref.weight)
            if bias:
                self.bias.copy_(ref.bias)

    def forward(self, x: torch.Tensor, stride: Optional[Sequence[int]] = None) -> torch.Tensor:
        stride = tuple(stride) if stride is not None else self.stride
        out_pad = tuple(max(s - k, 0) for s, k in zip(stride, self.kernel_size))
        y = F.conv_transpose3d(x, self.weight, self.bias, stride=stride, padding=0, output_padding=out_pad)
        for axis, (n, k, s) in enumerate(zip(x.shape[2:], self.kernel_size, stride)):
            start, length = tf_same_transpose_crop(int(n), k, s)
            y = y.narrow(2 + axis, start, length)
        return y

    def extra_repr(self) -> str:
        return f'{self.weight.shape[0]}, {self.weight.shape[1]}, kernel_size={self.kernel_size}, stride={self.stride}, padding=tf_same'


def _bn(chs: int, eps: float, momentum: float) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(chs, eps=eps, momentum=momentum)


class ConvBnAct3d(nn.Module):
    """Conv3d 3^3 'same' (with bias, as Keras) -> BN -> ReLU -> optional spatial dropout."""

    def __init__(self, in_chs: int, out_chs: int, bn_eps: float = KERAS_BN_EPS,
                 bn_momentum: float = KERAS_BN_MOMENTUM, drop_rate: float = 0.):
        super().__init__()
        self.conv = nn.Conv3d(in_chs, out_chs, 3, padding=1, bias=True)
        self.bn = _bn(out_chs, bn_eps, bn_momentum)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout3d(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.bn(self.conv(x))))


class ConvBlock3d(nn.Sequential):
    """Upstream's ``convolution_block``: two :class:`ConvBnAct3d`."""

    def __init__(self, in_chs: int, out_chs: int, **kwargs):
        super().__init__(ConvBnAct3d(in_chs, out_chs, **kwargs), ConvBnAct3d(out_chs, out_chs, **kwargs))


class EncoderStage3d(nn.Module):
    """[pyramid conv + concat] -> conv block; returns (pre-pool skip features, pooled features)."""

    def __init__(self, in_chs: int, out_chs: int, pyramid_chs: int = 0, **kwargs):
        super().__init__()
        self.pyramid_conv = nn.Conv3d(pyramid_chs, out_chs, 3, padding=1, bias=True) if pyramid_chs else None
        self.conv_block = ConvBlock3d(in_chs + (out_chs if pyramid_chs else 0), out_chs, **kwargs)

    def forward(self, x: torch.Tensor, scaled_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pyramid_conv is not None:
            x = torch.cat([F.relu(self.pyramid_conv(scaled_input)), x], dim=1)
        return self.conv_block(x)


class AttentionGate3d(nn.Module):
    """Attention gate on a skip connection; the gating signal ``g`` is at the skip's resolution.

    ``mode='concat'`` (upstream as coded): psi = sigmoid(BN(W_psi . ReLU([BN(W_g g), BN(W_x x)]))).
    ``mode='additive'`` (Oktay et al.): psi = sigmoid(BN(W_psi . ReLU(BN(W_g g) + BN(W_x x)))).
    Returns ``x * psi`` (psi broadcast over channels).
    """

    def __init__(self, gate_chs: int, skip_chs: int, inter_chs: int, mode: str = 'concat',
                 bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM):
        super().__init__()
        if mode not in ('concat', 'additive'):
            raise ValueError(f"ag_mode must be 'concat' (upstream Keras) or 'additive' (Oktay), got {mode!r}")
        self.mode = mode
        self.gate_conv = nn.Conv3d(gate_chs, inter_chs, 1, bias=True)
        self.gate_bn = _bn(inter_chs, bn_eps, bn_momentum)
        self.skip_conv = nn.Conv3d(skip_chs, inter_chs, 1, bias=True)
        self.skip_bn = _bn(inter_chs, bn_eps, bn_momentum)
        psi_in = 2 * inter_chs if mode == 'concat' else inter_chs
        self.psi_conv = nn.Conv3d(psi_in, 1, 1, bias=True)
        self.psi_bn = _bn(1, bn_eps, bn_momentum)

    def gate(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g1 = self.gate_bn(self.gate_conv(g))
        x1 = self.skip_bn(self.skip_conv(x))
        h = torch.cat([g1, x1], dim=1) if self.mode == 'concat' else g1 + x1
        return torch.sigmoid(self.psi_bn(self.psi_conv(F.relu(h))))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(g, x)


class PositionAttention3d(nn.Module):
    """DANet position attention (PAM) as upstream's Keras layer: single head, q/k width C/8, value
    width C, **no** 1/sqrt(d) scaling (scale 1.0), y = gamma * attn + x with gamma initialised to 0.

    Upstream creates the three 1x1 projections inside ``call()``, which tf.keras 1.x does not track:
    in the released DAGUNet only gamma was trained and the projections are random at every load.
    ``projections='trainable'`` (default) is the intended behaviour; ``'frozen'`` keeps them at
    their initial values like upstream (ablation only; released weights cannot be reproduced).
    """

    def __init__(self, chs: int, qk_ratio: int = 8, projections: str = 'trainable'):
        super().__init__()
        if projections not in ('trainable', 'frozen'):
            raise ValueError(f"pam_projections must be 'trainable' or 'frozen', got {projections!r}")
        if chs < qk_ratio:
            raise ValueError(f"PAM needs at least {qk_ratio} channels at the bottleneck, got {chs}")
        qk = chs // qk_ratio
        self.key = nn.Conv3d(chs, qk, 1, bias=False)    # upstream's "b" projection
        self.query = nn.Conv3d(chs, qk, 1, bias=False)  # upstream's "c" projection
        self.value = nn.Conv3d(chs, chs, 1, bias=False)  # upstream's "d" projection
        self.gamma = nn.Parameter(torch.zeros(1))
        if projections == 'frozen':
            for m in (self.key, self.query, self.value):
                m.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        q = self.query(x).flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, C/8), tokens row-major
        k = self.key(x).flatten(2).transpose(1, 2)[:, None]
        v = self.value(x).flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, C)
        out = attention(q, k, v, scale=1.0)[:, 0]  # Keras PAM has no 1/sqrt(d)
        return self.gamma * out.transpose(1, 2).reshape(x.shape) + x


class ChannelAttention3d(nn.Module):
    """Channel attention (CAM); y = gamma * out + x, gamma initialised to 0.

    ``mode='keras'`` (upstream): with X the (N, C) voxel-by-channel matrix, out = X softmax_row(X^T X).
    ``mode='danet'`` (Fu et al.): out^T = softmax_row(max(E) - E) X^T with E = X^T X, i.e. attention
    with the C channels as tokens of width N; it runs on the zoo's attention op.
    """

    def __init__(self, mode: str = 'keras'):
        super().__init__()
        if mode not in ('keras', 'danet'):
            raise ValueError(f"cam_mode must be 'keras' (upstream) or 'danet' (Fu et al.), got {mode!r}")
        self.mode = mode
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.flatten(2)  # (B, C, N)
        if self.mode == 'keras':
            # Not token attention: the softmax'd C x C matrix multiplies from the right (its columns
            # mix channels), so it stays two plain matmuls.
            energy = torch.bmm(a, a.transpose(1, 2))  # X^T X, (B, C, C)
            out = torch.bmm(energy.softmax(dim=-1).transpose(1, 2), a)  # (X S)^T = S^T X^T
        else:
            # softmax(max(E) - E) = softmax(-E) row-wise: queries -X^T, keys and values X^T.
            t = a[:, None]  # (B, 1, C, N)
            out = attention(-t, t, t, scale=1.0)[:, 0]
        return self.gamma * out.reshape(x.shape) + x


class DualAttention3d(nn.Module):
    """DAUNet bottleneck: PAM and CAM branches, each attention -> conv3 -> BN -> ReLU -> spatial
    dropout -> conv3; summed -> spatial dropout -> 1x1 conv -> BN."""

    def __init__(self, chs: int, cam_mode: str = 'keras', pam_projections: str = 'trainable',
                 attn_drop_rate: float = 0.5, bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM):
        super().__init__()
        self.pam = PositionAttention3d(chs, projections=pam_projections)
        self.cam = ChannelAttention3d(cam_mode)
        for name in ('pam', 'cam'):
            setattr(self, f'{name}_conv1', nn.Conv3d(chs, chs, 3, padding=1))
            setattr(self, f'{name}_bn', _bn(chs, bn_eps, bn_momentum))
            setattr(self, f'{name}_drop', nn.Dropout3d(attn_drop_rate))
            setattr(self, f'{name}_conv2', nn.Conv3d(chs, chs, 3, padding=1))
        self.drop = nn.Dropout3d(attn_drop_rate)
        self.proj = nn.Conv3d(chs, chs, 1)
        self.bn = _bn(chs, bn_eps, bn_momentum)

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, name)(x)
        x = F.relu(getattr(self, f'{name}_bn')(getattr(self, f'{name}_conv1')(x)))
        return getattr(self, f'{name}_conv2')(getattr(self, f'{name}_drop')(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._branch('pam', x) + self._branch('cam', x)
        return self.bn(self.proj(self.drop(y)))


class GatedDecoderBlock3d(nn.Module):
    """AGUNet decoder: up = ReLU(BN(ConvT(x))) is the gate signal; conv block on [up, gate(up, skip)]."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int, ag_mode: str = 'concat',
                 bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM, drop_rate: float = 0.):
        super().__init__()
        self.up = TFSameConvTranspose3d(in_chs, out_chs, 3, 2)
        self.up_bn = _bn(out_chs, bn_eps, bn_momentum)
        self.gate = AttentionGate3d(out_chs, skip_chs, int(out_chs / 2), ag_mode, bn_eps, bn_momentum)
        self.conv_block = ConvBlock3d(2 * out_chs, out_chs, bn_eps=bn_eps, bn_momentum=bn_momentum,
                                      drop_rate=drop_rate)

    def forward(self, x, skip, stride, bottom=None, bottom_stride=None):
        up = F.relu(self.up_bn(self.up(x, stride)))
        return self.conv_block(torch.cat([up, self.gate(up, skip)], dim=1))


class DecoderBlock3d(nn.Module):
    """DAUNet decoder: concat([guide?, skip, ConvT(x)]) -> BN -> ReLU -> conv block. With ``guided``
    the attended bottleneck is up-projected straight to this level by its own transposed conv."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int, guide_chs: int = 0,
                 bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM, drop_rate: float = 0.):
        super().__init__()
        self.up = TFSameConvTranspose3d(in_chs, out_chs, 3, 2)
        self.guide_up = TFSameConvTranspose3d(guide_chs, out_chs, 3, 2) if guide_chs else None
        cat_chs = skip_chs + out_chs + (out_chs if guide_chs else 0)
        self.bn = _bn(cat_chs, bn_eps, bn_momentum)
        self.conv_block = ConvBlock3d(cat_chs, out_chs, bn_eps=bn_eps, bn_momentum=bn_momentum, drop_rate=drop_rate)

    def forward(self, x, skip, stride, bottom=None, bottom_stride=None):
        parts = [skip, self.up(x, stride)]
        if self.guide_up is not None:
            parts.insert(0, self.guide_up(bottom, bottom_stride))
        return self.conv_block(F.relu(self.bn(torch.cat(parts, dim=1))))


class AttentionUNet3d(NotScriptable, nn.Module):
    """Bouget et al.'s 3-D U-Net family (see the module docstring for the flags).

    Args:
        filters: channels per level, the last one the bottleneck; ``len(filters) - 1`` pooling
            levels and as many decoder levels / heads.
        in_chans: input channels (1 for T1 MRI).
        num_classes: output classes incl. background (upstream: 2).
        input_pyramid, deep_supervision, attention_gates, dual_attention, guided: the paper's concepts.
        ag_mode: 'concat' (upstream) or 'additive' (Oktay).
        cam_mode: 'keras' (upstream) or 'danet'.
        pam_projections: 'trainable' or 'frozen' (see :class:`PositionAttention3d`).
        drop_rate: spatial dropout after every conv of the conv blocks (upstream: None).
        attn_drop_rate: spatial dropout of the dual-attention bottleneck (upstream: 0.5).
        min_pool_size: axes of at most this size are not pooled (upstream: 4).
        bn_eps, bn_momentum: BatchNorm settings (Keras defaults; torch momentum convention).
        global_pool, drop_path_rate: accepted for timm's create_model; a segmenter has neither.
    """

    def __init__(
            self,
            filters: Sequence[int] = (16, 32, 128, 256, 256),
            in_chans: int = 1,
            num_classes: int = 2,
            input_pyramid: bool = True,
            deep_supervision: bool = True,
            attention_gates: bool = True,
            ag_mode: str = 'concat',
            dual_attention: bool = False,
            guided: bool = False,
            cam_mode: str = 'keras',
            pam_projections: str = 'trainable',
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.5,
            min_pool_size: int = 4,
            bn_eps: float = KERAS_BN_EPS,
            bn_momentum: float = KERAS_BN_MOMENTUM,
            global_pool: str = '',
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        filters = tuple(int(f) for f in filters)
        if len(filters) < 2 or min(filters) < 1:
            raise ValueError(f"filters must list >= 2 positive channel counts (levels + bottleneck), got {filters}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (a segmenter always has a head), got {num_classes}")
        if global_pool:
            raise ValueError(f"{type(self).__name__} is a segmenter: global_pool must be '' (no pooling), got {global_pool!r}")
        if drop_path_rate:
            raise ValueError(f"{type(self).__name__} has no residual paths: drop_path_rate must be 0, got {drop_path_rate}")
        if guided and not dual_attention:
            raise ValueError("guided=True up-projects the dual-attention bottleneck: it needs dual_attention=True")
        if attention_gates and dual_attention:
            raise ValueError("upstream combines either attention gates (AGUNet) or dual attention (DAUNet); pick one")
        self.filters = filters
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.input_pyramid = input_pyramid
        self.deep_supervision = deep_supervision
        self.attention_gates = attention_gates
        self.dual_attention = dual_attention
        self.guided = guided
        self.min_pool_size = int(min_pool_size)
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        bkw = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)

        levels = len(filters) - 1
        stages = []
        for i in range(levels):
            in_chs = in_chans if i == 0 else filters[i - 1]
            pyr = in_chans if (input_pyramid and i > 0) else 0
            stages.append(EncoderStage3d(in_chs, filters[i], pyr, drop_rate=drop_rate, **bkw))
        self.stages = nn.ModuleList(stages)
        self.bottleneck = ConvBlock3d(filters[-2], filters[-1], drop_rate=drop_rate, **bkw)
        self.dual = DualAttention3d(filters[-1], cam_mode, pam_projections, attn_drop_rate, **bkw) \
            if dual_attention else None

        decoders = []
        in_chs = filters[-1]
        for i in range(levels - 1, -1, -1):  # coarsest first
            if attention_gates:
                decoders.append(GatedDecoderBlock3d(in_chs, filters[i], filters[i], ag_mode, drop_rate=drop_rate, **bkw))
            else:
                decoders.append(DecoderBlock3d(in_chs, filters[i], filters[i], filters[-1] if guided else 0,
                                               drop_rate=drop_rate, **bkw))
            in_chs = filters[i]
        self.decoders = nn.ModuleList(decoders)
        head_chs = filters[:levels] if deep_supervision else filters[:1]
        self.heads = nn.ModuleList([nn.Conv3d(c, num_classes, 1) for c in head_chs])  # finest first

        self.num_features = self.head_hidden_size = filters[0]
        self.feature_info = [dict(num_chs=filters[i], reduction=2 ** i, module=f'stages.{i}') for i in range(levels)]
        self.feature_info.append(dict(num_chs=filters[-1], reduction=2 ** levels,
                                      module='dual' if dual_attention else 'bottleneck'))

    # -- timm API ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stages\.0', blocks=[(r'^stages\.(\d+)', None), (r'^bottleneck|^dual', (99998,)),
                                                 (r'^decoders\.(\d+)', (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith('.gamma')}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.heads[0]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New 1x1 heads for ``num_classes`` classes; 0 removes them (the model then returns the
        decoder features, as a timm classifier returns pooled features)."""
        if global_pool:
            raise UnsupportedError(f"reset_classifier(global_pool={global_pool!r}) asked of a per-voxel segmenter, "
                                   "which has no global pooling; pass global_pool=None and pool the output yourself")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 removes the heads), got {num_classes}")
        self.num_classes = num_classes
        chs = [self.feature_info[i]['num_chs'] for i in range(len(self.heads))]
        self.heads = nn.ModuleList([nn.Conv3d(c, num_classes, 1) if num_classes else nn.Identity() for c in chs])

    # -- forward -----------------------------------------------------------------------------------
    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _check_input(self, x: torch.Tensor):
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, D1, D2, D3) volume, got shape {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[Tuple[int, ...]], torch.Tensor]:
        """Encoder + bottleneck: (skips finest first, per-level pool factors, bottleneck features)."""
        self._check_input(x)
        skips, factors = [], []
        scaled = x
        for i, stage in enumerate(self.stages):
            f = pool_factors(x.shape[2:], self.min_pool_size)
            for ax, (s, fa) in enumerate(zip(x.shape[2:], f)):
                if fa == 2 and s % 2:
                    raise ValueError(
                        f"axis {ax} has odd size {s} at encoder level {i} (input {tuple(x.shape[2:])}); the "
                        f"decoder doubles it back, so every pooled axis must halve evenly: use sizes that are "
                        f"multiples of 2^levels (axes that reach <= {self.min_pool_size} stop pooling)")
            if i > 0 and self.input_pyramid:
                scaled = F.avg_pool3d(scaled, factors[-1], factors[-1])
            skip = self._run(stage, x, scaled) if stage.pyramid_conv is not None else self._run(stage, x)
            skips.append(skip)
            factors.append(f)
            x = F.max_pool3d(skip, f, f)
        x = self._run(self.bottleneck, x)
        return skips, factors, x

    def forward_decoder(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Decoder features, finest first."""
        skips, factors, x = self.encode(x)
        if self.dual is not None:
            x = self._run(self.dual, x)
        bottom = x
        decoded = []
        bottom_stride = (1, 1, 1)
        for j, dec in enumerate(self.decoders):
            level = len(self.decoders) - 1 - j
            stride = factors[level]
            bottom_stride = tuple(a * b for a, b in zip(bottom_stride, stride))
            x = self._run(dec, x, skips[level], stride, bottom, bottom_stride)
            decoded.append(x)
        return decoded[::-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Finest decoder features (B, filters[0], D1, D2, D3)."""
        return self.forward_decoder(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.heads[0](x)

    def forward_all(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every head, finest first (one entry without deep supervision)."""
        feats = self.forward_decoder(x)
        return [head(f) for head, f in zip(self.heads, feats)]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.deep_supervision and self.training:
            return self.forward_all(x)
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of the finest head: upstream's ``predictions[0]``."""
        return self.forward_head(self.forward_features(x)).float().softmax(dim=1)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCDHW',
                              intermediates_only: bool = False):
        """Encoder features (pre-pool skips, then the (attended) bottleneck) as in ``feature_info``;
        the final output is the finest decoder feature map (``forward_features``)."""
        if output_fmt not in ('NCDHW', 'NCHW'):
            raise ValueError(f"output_fmt must be 'NCDHW' (channels first), got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        skips, _, bottom = self.encode(x)
        if self.dual is not None:
            bottom = self.dual(bottom)
        feats = skips + [bottom]
        inter = [feats[i] for i in take]
        if intermediates_only:
            return inter
        return self.forward_features(x), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """A U-Net's decoder needs every encoder level, so nothing can be pruned; returns the indices."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        return take

    # -- Keras weight mapping ------------------------------------------------------------------------
    def keras_layers(self) -> List[Tuple[str, str]]:
        """(Keras layer type, torch module path) for every weighted Keras layer, in the order the
        upstream builder creates them (which is the order of their auto-generated name suffixes)."""
        out = []

        def cb(p):
            out.extend([('Conv3D', f'{p}.0.conv'), ('BatchNormalization', f'{p}.0.bn'),
                        ('Conv3D', f'{p}.1.conv'), ('BatchNormalization', f'{p}.1.bn')])

        for i, st in enumerate(self.stages):
            if st.pyramid_conv is not None:
                out.append(('Conv3D', f'stages.{i}.pyramid_conv'))
            cb(f'stages.{i}.conv_block')
        cb('bottleneck')
        if self.dual is not None:
            for name, kind in (('pam', 'PAM'), ('cam', 'CAM')):
                out += [(kind, f'dual.{name}'), ('Conv3D', f'dual.{name}_conv1'),
                        ('BatchNormalization', f'dual.{name}_bn'), ('Conv3D', f'dual.{name}_conv2')]
            out += [('Conv3D', 'dual.proj'), ('BatchNormalization', 'dual.bn')]
        for j, dec in enumerate(self.decoders):
            p = f'decoders.{j}'
            if isinstance(dec, GatedDecoderBlock3d):
                out += [('Conv3DTranspose', f'{p}.up'), ('BatchNormalization', f'{p}.up_bn'),
                        ('Conv3D', f'{p}.gate.gate_conv'), ('BatchNormalization', f'{p}.gate.gate_bn'),
                        ('Conv3D', f'{p}.gate.skip_conv'), ('BatchNormalization', f'{p}.gate.skip_bn'),
                        ('Conv3D', f'{p}.gate.psi_conv'), ('BatchNormalization', f'{p}.gate.psi_bn')]
            else:
                out.append(('Conv3DTranspose', f'{p}.up'))
                if dec.guide_up is not None:
                    out.append(('Conv3DTranspose', f'{p}.guide_up'))
                out.append(('BatchNormalization', f'{p}.bn'))
            cb(f'{p}.conv_block')
        # heads are created coarse to fine, after the decoder; ours are finest first
        for k in range(len(self.heads) - 1, -1, -1):
            out.append(('Conv3D', f'heads.{k}'))
        return out


def keras_to_torch(kind: str, weights: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """One Keras layer's weights (names without ':0') -> torch parameter/buffer names and tensors."""
    t = {k: torch.as_tensor(v) for k, v in weights.items()}
    if kind in ('Conv3D', 'Conv3DTranspose'):
        # Conv3D kernel (k1, k2, k3, in, out) -> (out, in, k...); Conv3DTranspose (k..., out, in) ->
        # torch ConvTranspose3d (in, out, k...): the same permutation. No flip: both are correlations.
        out = {'weight': t['kernel'].permute(4, 3, 0, 1, 2).contiguous()}
        if 'bias' in t:
            out['bias'] = t['bias']
        return out
    if kind == 'BatchNormalization':
        return {'weight': t['gamma'], 'bias': t['beta'], 'running_mean': t['moving_mean'],
                'running_var': t['moving_variance']}
    if kind in ('PAM', 'CAM'):
        return {'gamma': t['gamma'].reshape(1)}
    raise ValueError(f"no mapping for Keras layer type {kind!r}")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: AttentionUNet3d) -> Dict[str, torch.Tensor]:
    """Accept zoo state dicts, mmengine checkpoints (``state_dict`` with a ``model.`` prefix) and
    files written by tools/convert_keras_agunet.py (already in zoo layout)."""
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    out = {}
    for k, v in state_dict.items():
        for prefix in ('model.', 'module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


_DATA_PIPELINE = ("the 3-D volume pipeline of zoo.tasks.seg3d (preprocess_volume: isotropic resampling, "
                  "intensity normalisation, resize to the cfg's input_size (C, D1, D2, D3); NiftiSegDataset)")


def _create(variant: str, pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    # timm's builder reads input_size as (C, H, W); the volume size (C, D1, D2, D3) goes back on
    # the model's cfg after the build. features_only: every encoder level and the bottleneck.
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay)
    model = build_model(AttentionUNet3d, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                        pretrained_cfg_overlay=dict(overlay, input_size=None),
                        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(len(kwargs['filters'])))),
                        **kwargs)
    target = model.model if isinstance(model, FeatureGetterNet) else model
    data_cfg = NoImageDataConfig(dict(target.pretrained_cfg, input_size=cfg.input_size), _DATA_PIPELINE)
    target.pretrained_cfg = target.default_cfg = data_cfg
    if target is not model:
        model.pretrained_cfg = model.default_cfg = data_cfg
    return model


_NOTES = (
    "upstream releases Keras .h5 models in a Google-Drive zip (id 1QJZWF9CzgOiYzjzsRSu2LOkrzi2S6j_U, "
    "md5 8920cc50fee3505e958307fa11088c0d, via the repo's setup.py); convert with "
    "tools/convert_keras_agunet.py and load with pretrained_cfg_overlay=dict(file=...)",
    "filters and input size of the released models are not confirmed (resources/models/*/pre_processing.ini)",
    "3-D segmenter: input (B, 1, D1, D2, D3) of intensity-normalised MRI; input_size is (C, D1, D2, D3), "
    "and timm's 2-D image data config does not apply (zoo.tasks.seg3d prepares volumes)",
)


def _cfg(**kwargs):
    base = dict(
        license='bsd-2-clause', paper_ids='arXiv:2101.07715',
        paper_name='Meningioma segmentation in T1-weighted MRI leveraging global context and attention mechanisms',
        origin_url='https://github.com/dbouget/mri_brain_tumor_segmentation',
        # input_size is (C, D1, D2, D3); test_input_size repeats it for readers of the eval size.
        # No 2-D image fields: volumes are resampled and intensity-normalised by zoo.tasks.seg3d.
        num_classes=2, input_size=(1, 128, 128, 144), test_input_size=(1, 128, 128, 144), fixed_input_size=False,
        pool_size=None, crop_pct=None, crop_mode=None, interpolation=None, mean=None, std=None,
        first_conv='stages.0.conv_block.0.conv', classifier=('heads.0', 'heads.1', 'heads.2', 'heads.3'),
        notes=_NOTES)
    base.update(kwargs)
    return hub.cfg(**base)


default_cfgs = generate_default_cfgs({
    'agunet_3d': _cfg(),
    'daunet_3d': _cfg(),
    'dagunet_3d': _cfg(),
    'agunet_3d_small': _cfg(input_size=(1, 32, 32, 32), test_input_size=(1, 32, 32, 32)),
    'daunet_3d_small': _cfg(input_size=(1, 32, 32, 32), test_input_size=(1, 32, 32, 32)),
    'dagunet_3d_small': _cfg(input_size=(1, 32, 32, 32), test_input_size=(1, 32, 32, 32)),
})

_BASE_FILTERS = (16, 32, 128, 256, 256)  # [unverified] the released models' pre_processing.ini is not public
_SMALL_FILTERS = (8, 16, 32, 64, 64)


@register_model
def agunet_3d(pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    """AGUNet: multi-scale input, deep supervision, attention-gated skips (upstream concat gate)."""
    args = dict(filters=_BASE_FILTERS, attention_gates=True)
    return _create('agunet_3d', pretrained, **dict(args, **kwargs))


@register_model
def daunet_3d(pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    """DAUNet: multi-scale input, deep supervision, dual attention (PAM + Keras CAM) at the bottleneck."""
    args = dict(filters=_BASE_FILTERS, attention_gates=False, dual_attention=True)
    return _create('daunet_3d', pretrained, **dict(args, **kwargs))


@register_model
def dagunet_3d(pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    """DAGUNet (upstream's released 'DAGUNet'): DAUNet with the attention-guided decoder."""
    args = dict(filters=_BASE_FILTERS, attention_gates=False, dual_attention=True, guided=True)
    return _create('dagunet_3d', pretrained, **dict(args, **kwargs))


@register_model
def agunet_3d_small(pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    """AGUNet with filters (8, 16, 32, 64, 64): CPU-sized."""
    args = dict(filters=_SMALL_FILTERS, attention_gates=True)
    return _create('agunet_3d_small', pretrained, **dict(args, **kwargs))


@register_model
def daunet_3d_small(pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    """DAUNet with filters (8, 16, 32, 64, 64): CPU-sized."""
    args = dict(filters=_SMALL_FILTERS, attention_gates=False, dual_attention=True)
    return _create('daunet_3d_small', pretrained, **dict(args, **kwargs))


@register_model
def dagunet_3d_small(pretrained: bool = False, **kwargs) -> AttentionUNet3d:
    """DAGUNet with filters (8, 16, 32, 64, 64): CPU-sized."""
    args = dict(filters=_SMALL_FILTERS, attention_gates=False, dual_attention=True, guided=True)
    return _create('dagunet_3d_small', pretrained, **dict(args, **kwargs))
