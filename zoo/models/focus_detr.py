# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from huawei-noah/noah-research (MIT; Copyright (C) 2023. Huawei Technologies Co., Ltd and McGill University); see THIRD_PARTY_NOTICES.md
# Derived from IDEA-Research/detrex (Apache-2.0; Copyright 2022 - present, IDEA, Inc); see THIRD_PARTY_NOTICES.md
"""Focus-DETR: "Less is More: Focus Attention for Efficient DETR" (Zheng et al., ICCV 2023).

A DINO detector whose encoder only updates foreground tokens. A Foreground Token Selector (FTS)
scores every multi-scale token once, top-down over the levels; encoder layer l updates the
``cascade[l]`` best-scored share of them (nested subsets). Inside each layer the OESM
self-attention runs over the ``topk_sa`` tokens ranked by (max class logit x foreground logit),
then multi-scale deformable cross-attention reads the *original* flattened features (detrex's
behaviour, which the released weights were trained with). Two-stage proposals feed a DINO decoder
with contrastive denoising and look-forward-twice box refinement.

Follows the detrex implementation (``projects/focus_detr``), with these deliberate deviations:
  * ``k = min(topk_sa, kept tokens)`` and ``min(num_queries, tokens)``: upstream raises on small
    images (detrex#354);
  * padding masks are used at inference too (detrex passes an all-valid mask at test time);
  * no aliased parameters: the encoder's MCSP and the decoder read the heads from the model.

The Swin variants use timm's Swin features set up to compute what detectron2's SwinTransformer
does (a LayerNorm per output level, windows padded before the shift, every stage shifted), so
detrex's Swin checkpoints load and reproduce upstream's outputs at any image size.

Softmax attention runs in ``zoo.kernels.attention`` (OESM and decoder self-attention, the CDN mask
as a ``from_dense_mask`` layout); deformable attention in ``zoo.kernels.msda``.
"""
import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import LayerNorm2d, PatchEmbed, freeze_batch_norm_2d
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torchvision.ops import sigmoid_focal_loss

import zoo.kernels as _kernels
from zoo.errors import NotScriptable, UnsupportedError
from zoo.hub import cfg as hub_cfg
from zoo.models._builder import build_model
from zoo.kernels.msda import MultiScaleDeformableAttention
from zoo.layers.detr_blocks import (FFN, MLP, HungarianMatcher, PositionEmbeddingSine, box_cxcywh_to_xyxy,
                                    build_cdn_queries, cdn_attn_mask, dn_match_indices, inverse_sigmoid,
                                    set_losses, sine_box_embed)

__all__ = ["FocusDETR", "FocusDETRCriterion", "MaskPredictor", "ForegroundTokenSelector", "OESMAttention",
           "ChannelMapper", "cascade_token_counts", "select_foreground", "foreground_targets", "checkpoint_filter_fn"]


# ------------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------------
class ConvGN(nn.Module):
    """Conv + GroupNorm (ChannelMapper unit; ``conv`` / ``norm`` names as in detrex)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=True)
        self.norm = nn.GroupNorm(groups, out_chs)

    def forward(self, x):
        return self.norm(self.conv(x))


class ChannelMapper(nn.Module):
    """1x1 conv + GN per backbone level to ``out_chs``; extra levels are 3x3 stride-2 conv + GN,
    the first on the *last backbone map* (C5, not the mapped P5), the next ones on the previous
    extra level."""

    def __init__(self, in_chs: Sequence[int], out_chs: int = 256, num_outs: int = 4, groups: int = 32):
        super().__init__()
        if num_outs < len(in_chs):
            raise ValueError(f"ChannelMapper: num_outs={num_outs} < number of backbone levels {len(in_chs)}")
        self.convs = nn.ModuleList(ConvGN(c, out_chs, 1, groups=groups) for c in in_chs)
        self.extra_convs = nn.ModuleList(
            ConvGN(in_chs[-1] if i == 0 else out_chs, out_chs, 3, 2, groups=groups)
            for i in range(num_outs - len(in_chs)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        x = feats[-1]
        for conv in self.extra_convs:
            x = conv(x)
            outs.append(x)
        return outs


class PadFirstSwinBlock(SwinTransformerBlock):
    """timm's Swin block with detectron2's window order: the map is padded to whole windows
    *before* the cyclic shift, so the padding wraps around with it and the shift mask is laid over
    the padded grid (timm shifts first, then pads). Same parameters and names; the two agree when
    every stage's map is a whole number of windows."""

    def _attn(self, x):
        B, H, W, C = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        Hp, Wp = x.shape[1:3]
        shift = tuple(self.shift_size)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = self.get_attn_mask(x) if self.dynamic_mask else self.attn_mask
        windows = self.attn(window_partition(x, self.window_size).view(-1, self.window_area, C), mask=mask)
        x = window_reverse(windows.view(-1, wh, ww, C), self.window_size, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous()


class MaskPredictor(nn.Module):
    """Sparse-DETR token scorer: per-token features plus the level's mean feature -> one logit.

    The mean runs over every token of the level, padding included (as upstream)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4), nn.GELU(),
            nn.Linear(hidden_dim // 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer1(x)
        h = self.hidden_dim // 2
        z_local, z_global = z[..., :h], z[..., h:]
        z_global = z_global.mean(dim=1, keepdim=True).expand(-1, z.shape[1], -1)
        return self.layer2(torch.cat([z_local, z_global], dim=-1))


class ForegroundTokenSelector(nn.Module):
    """Top-down foreground scoring: the coarsest level is scored first; each finer level is
    modulated by the upsampled *raw logit* map of the level above (``m + m * up(s) * alpha``)
    before scoring. Returns raw logits (B, N) in level order."""

    def __init__(self, dim: int, num_levels: int = 4):
        super().__init__()
        self.num_levels = num_levels
        self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-0.3, 0.3))
        self.mask_predictor = MaskPredictor(dim, dim)

    def forward(self, memory: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        B, _, C = memory.shape
        sizes = [h * w for h, w in spatial_shapes]
        levels = list(memory.split(sizes, dim=1))
        scores: List[Optional[torch.Tensor]] = [None] * len(levels)
        prev = None
        for step, lvl in enumerate(range(len(levels) - 1, -1, -1)):
            h, w = spatial_shapes[lvl]
            m = levels[lvl]
            if prev is not None:
                up = F.interpolate(prev, size=(h, w), mode="bilinear", align_corners=True)
                m = m + m * up.flatten(2).transpose(1, 2) * self.alpha[step - 1]
            s = self.mask_predictor(m)  # (B, hw, 1)
            scores[lvl] = s
            prev = s.transpose(1, 2).reshape(B, 1, h, w)
        return torch.cat(scores, dim=1).squeeze(-1)


class KernelMHA(nn.Module):
    """``nn.MultiheadAttention`` parameters (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) with
    the softmax in ``zoo.kernels.attention``. q and k are projected from ``x + pos``, v from ``x``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, layout=None) -> torch.Tensor:
        B, L, C = x.shape
        H = self.num_heads
        qk_in = x if pos is None else x + pos
        w_qk, w_v = self.in_proj_weight[:2 * C], self.in_proj_weight[2 * C:]
        b_qk, b_v = self.in_proj_bias[:2 * C], self.in_proj_bias[2 * C:]
        q, k = F.linear(qk_in, w_qk, b_qk).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4)
        v = F.linear(x, w_v, b_v).view(B, L, H, C // H).transpose(1, 2)
        out = _kernels.attention(q, k, v, layout)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class OESMAttention(nn.Module):
    """Object-enhanced self-attention over the ``topk_sa`` best tokens (per image) of a token set:
    ``x[sel] <- LN(x[sel] + MHA(x[sel] + pos[sel]))``, others unchanged. ``topk_sa`` is clamped to
    the set size (upstream fails below 300 tokens, detrex#354)."""

    def __init__(self, dim: int, num_heads: int, topk_sa: int = 300):
        super().__init__()
        self.topk_sa = topk_sa
        self.attn = KernelMHA(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        k = min(self.topk_sa, x.shape[1])
        sel = score.topk(k, dim=1).indices[..., None].expand(-1, -1, C)
        xs = x.gather(1, sel)
        y = self.norm(xs + self.attn(xs, pos.gather(1, sel)))
        return x.scatter(1, sel, y)


class FocusEncoderLayer(nn.Module):
    """OESM -> deformable cross-attention (value = original features) -> norm -> FFN -> norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_levels: int, num_points: int,
                 topk_sa: int, dropout: float = 0.):
        super().__init__()
        self.oesm = OESMAttention(dim, num_heads, topk_sa)
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, dropout=dropout,
                                                        batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, pos, ref, score, value, spatial_shapes, level_start_index, padding_mask):
        x = self.oesm(x, pos, score)
        x = self.cross_attn(x, value=value, query_pos=pos, key_padding_mask=padding_mask,
                            reference_points=ref, spatial_shapes=spatial_shapes,
                            level_start_index=level_start_index)
        x = self.norm1(x)
        return self.norm2(self.ffn(x))


class DecoderLayer(nn.Module):
    """DINO decoder layer: self-attention (CDN mask) -> norm -> deformable cross -> norm -> FFN -> norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_levels: int, num_points: int,
                 dropout: float = 0.):
        super().__init__()
        self.self_attn = KernelMHA(dim, num_heads)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, dropout=dropout,
                                                        batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, pos, ref, memory, spatial_shapes, level_start_index, padding_mask, layout=None):
        x = self.norm1(x + self.drop(self.self_attn(x, pos, layout)))
        x = self.cross_attn(x, value=memory, query_pos=pos, key_padding_mask=padding_mask, reference_points=ref,
                            spatial_shapes=spatial_shapes, level_start_index=level_start_index)
        x = self.norm2(x)
        return self.norm3(self.ffn(x))


class FocusDecoder(nn.Module):
    def __init__(self, dim: int, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, **layer_kwargs) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim)
        self.dim = dim


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), in plain Python: a product of two
    float32 values is exact in a double, so ``_float32(_float32(a) * _float32(b))`` is float32's
    product, and tracers see a constant."""
    if x == 0:
        return 0.0
    m, e = math.frexp(x)
    return math.ldexp(round(m * 16777216.0), e - 24)


def cascade_token_counts(valid_tokens: Union[torch.Tensor, int], focus_rho: float, cascade: Sequence[float],
                         num_tokens: int) -> Tuple[Union[torch.Tensor, int], List[int]]:
    """Per-image foreground budget ``int(rho * valid) + 1`` and per-layer kept counts
    ``int(cascade[l] * max budget)`` (float32 products, as upstream), clamped to [1, num_tokens].

    ``valid_tokens`` is a (B,) tensor, or an int when every image has that many valid tokens (no
    padding): then the budget is an int too and nothing waits on the device."""
    if isinstance(valid_tokens, torch.Tensor):
        focus = (valid_tokens.float() * focus_rho).int() + 1
        top = int(focus.max())
    else:
        focus = top = int(_float32(_float32(float(valid_tokens)) * _float32(focus_rho))) + 1
    ks = [int(_float32(_float32(float(c)) * top)) for c in cascade]
    return focus, [max(1, min(k, num_tokens)) for k in ks]


def select_foreground(fg_logits: torch.Tensor, padding_mask: Optional[torch.Tensor], focus_rho: float,
                      cascade: Sequence[float]):
    """Rank tokens once by foreground logit (padding filled with the batch minimum, as upstream).

    Returns (filled logits, order (B, k_0) best first, per-image budgets (B,), per-layer counts);
    layer l uses ``order[:, :k_l]``, so the subsets are nested. ``padding_mask=None``: no padding,
    every count is known from the shapes alone."""
    B, N = fg_logits.shape
    if padding_mask is None:
        filled = fg_logits
        focus, ks = cascade_token_counts(N, focus_rho, cascade, N)
        focus_nums = torch.full((B,), focus, dtype=torch.int32, device=fg_logits.device)
    else:
        filled = fg_logits.masked_fill(padding_mask, fg_logits.detach().min())
        focus_nums, ks = cascade_token_counts((~padding_mask).sum(1), focus_rho, cascade, N)
    order = filled.topk(ks[0], dim=1).indices
    return filled, order, focus_nums, ks


def foreground_targets(spatial_shapes: Sequence[Tuple[int, int]], strides: Sequence[int],
                       ranges: Sequence[Sequence[float]], boxes_xyxy: Sequence[torch.Tensor],
                       device=None) -> torch.Tensor:
    """FCOS-style binary targets (B, N): a token is foreground if its centre
    ``(j * s + s // 2, i * s + s // 2)`` (pixels) lies strictly inside a box whose largest
    centre-to-side distance is in the level's ``(lo, hi]`` range."""
    out = []
    for boxes in boxes_xyxy:
        per = []
        for (h, w), s, (lo, hi) in zip(spatial_shapes, strides, ranges):
            ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
            xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
            if boxes.numel() == 0:
                per.append(torch.zeros(h * w, dtype=torch.bool, device=device))
                continue
            b = boxes.to(device=device, dtype=torch.float32)
            ltrb = torch.stack([cx - b[:, 0], cy - b[:, 1], b[:, 2] - cx, b[:, 3] - cy], -1)
            inside = ltrb.min(-1).values > 0
            mx = ltrb.max(-1).values
            per.append((inside & (mx > lo) & (mx <= hi)).any(-1))
        out.append(torch.cat(per))
    return torch.stack(out).float()


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
# everything after the neck: what prune_intermediate_layers removes for features_only
_DETECTOR_MODULES = ("level_embed", "enc_output", "enc_output_norm", "fts", "encoder", "decoder", "tgt_embed",
                     "label_enc", "class_embed", "bbox_embed")


class FocusDETR(NotScriptable, nn.Module):
    """Focus-DETR detector.

    ``forward(images, masks=None, targets=None)``: images (B, C, H, W) normalised; masks (B, H, W)
    bool, True = padding; targets (training, for denoising): list of dicts with ``labels`` (n,)
    and ``boxes`` (n, 4) cxcywh normalised to each image's valid area. Returns a dict with
    ``pred_logits`` (B, Q, num_classes), ``pred_boxes`` (B, Q, 4) cxcywh in [0, 1] of the valid
    area, ``aux_outputs``, ``enc_outputs``, ``dn_outputs`` / ``dn_meta`` (training with targets),
    ``fg_logits`` (B, N) and ``spatial_shapes``.

    ``backbone_norm`` adds a LayerNorm to each backbone output level and ``swin_pad_first`` pads a
    timm Swin backbone's windows before the shift: both as detectron2's SwinTransformer, which
    detrex's Swin checkpoints need (set by ``focus_detr_swin_*``).
    """

    def __init__(
            self,
            num_classes: int = 80,
            in_chans: int = 3,
            backbone: str = "resnet50",
            backbone_pretrained: bool = False,
            backbone_out_indices: Tuple[int, ...] = (2, 3, 4),
            backbone_kwargs: Optional[Dict[str, Any]] = None,
            backbone_norm: bool = False,
            swin_pad_first: bool = False,
            frozen_bn: bool = True,
            backbone_freeze_at: int = 1,
            embed_dim: int = 256,
            num_heads: int = 8,
            ffn_dim: int = 2048,
            num_levels: int = 4,
            num_points: int = 4,
            enc_layers: int = 6,
            dec_layers: int = 6,
            dropout: float = 0.,
            gn_groups: int = 32,
            pos_temperature: float = 10000.,
            pos_offset: float = -0.5,
            num_queries: int = 900,
            num_select: int = 300,
            focus_rho: float = 0.5,
            cascade: Sequence[float] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
            topk_sa: int = 300,
            dn_number: int = 100,
            label_noise_ratio: float = 0.5,
            box_noise_scale: float = 1.0,
            look_forward_twice: bool = True,
            **kwargs,
    ):
        super().__init__()
        for k in ("global_pool", "drop_rate", "drop_path_rate", "img_size"):
            kwargs.pop(k, None)  # classifier-style arguments timm may pass; meaningless here
        if kwargs:
            raise TypeError(f"FocusDETR got unexpected arguments: {sorted(kwargs)}")
        if len(cascade) != enc_layers:
            raise ValueError(f"cascade has {len(cascade)} keep ratios but enc_layers={enc_layers}; give one "
                             "ratio per encoder layer")
        if not 0 < focus_rho <= 1:
            raise ValueError(f"focus_rho must be in (0, 1], got {focus_rho}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.num_select = num_select
        self.focus_rho = focus_rho
        self.cascade = tuple(float(c) for c in cascade)
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.look_forward_twice = look_forward_twice
        self.grad_checkpointing = False

        self.backbone = timm.create_model(backbone, pretrained=backbone_pretrained, features_only=True,
                                          out_indices=backbone_out_indices, in_chans=in_chans,
                                          **(backbone_kwargs or {}))
        if swin_pad_first:
            blocks = [m for m in self.backbone.modules() if isinstance(m, SwinTransformerBlock)]
            if not blocks:
                raise ValueError(f"swin_pad_first=True needs a timm Swin backbone; {backbone!r} has no Swin blocks")
            for blk in blocks:
                blk.__class__ = PadFirstSwinBlock
        fmt = getattr(self.backbone, "output_fmt", "NCHW")
        self._backbone_nhwc = getattr(fmt, "value", fmt) == "NHWC"  # e.g. timm Swin features
        chs = self.backbone.feature_info.channels()
        self.backbone_strides = tuple(self.backbone.feature_info.reduction())
        # one LayerNorm per backbone output level (detectron2's SwinTransformer ``norm{i}``)
        norm_layer = nn.LayerNorm if self._backbone_nhwc else LayerNorm2d
        self.backbone_norms = nn.ModuleList(norm_layer(c) for c in chs) if backbone_norm else None
        if frozen_bn:
            self.backbone = freeze_batch_norm_2d(self.backbone)
        self._freeze_stages(backbone_freeze_at)
        self.strides = self.backbone_strides + tuple(
            self.backbone_strides[-1] * 2 ** (i + 1) for i in range(num_levels - len(chs)))
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=s,
                 module=f"neck.convs.{i}" if i < len(chs) else f"neck.extra_convs.{i - len(chs)}")
            for i, s in enumerate(self.strides)]
        self.neck = ChannelMapper(chs, embed_dim, num_levels, gn_groups)
        self.position_embedding = PositionEmbeddingSine(embed_dim // 2, pos_temperature, True, offset=pos_offset)
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        self.fts = ForegroundTokenSelector(embed_dim, num_levels)
        self.encoder = nn.ModuleList(
            FocusEncoderLayer(embed_dim, num_heads, ffn_dim, num_levels, num_points, topk_sa, dropout)
            for _ in range(enc_layers))
        self.decoder = FocusDecoder(embed_dim, dec_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                                    num_levels=num_levels, num_points=num_points, dropout=dropout)
        self.tgt_embed = nn.Embedding(num_queries, embed_dim)
        self.label_enc = nn.Embedding(num_classes, embed_dim)
        # dec_layers heads for the decoder + 1 for the two-stage proposals (also the encoder's MCSP)
        self.class_embed = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(dec_layers + 1))
        self.bbox_embed = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(dec_layers + 1))
        self.init_weights()

    def _freeze_stages(self, freeze_at: int):
        """detectron2 ``freeze_at``: 1 = stem, k >= 2 = stem and the first k-1 residual stages."""
        if freeze_at <= 0:
            return
        names = [n for n, _ in self.backbone.named_children()]
        if "layer1" not in names:
            raise ValueError(f"backbone_freeze_at={freeze_at} is defined for ResNet-style backbones "
                             f"(conv1/bn1/layer1..); this backbone has children {names[:8]}; use 0")
        frozen = [n for n in names[:names.index("layer1")]] + [f"layer{i}" for i in range(1, freeze_at)]
        for n in frozen:
            if hasattr(self.backbone, n):
                for p in getattr(self.backbone, n).parameters():
                    p.requires_grad_(False)

    def init_weights(self):
        for m in list(self.encoder.modules()) + list(self.decoder.modules()) + list(self.fts.modules()):
            if isinstance(m, nn.Linear) and m.weight.dim() > 1:
                nn.init.xavier_uniform_(m.weight)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.xavier_uniform_(self.enc_output.weight)
        nn.init.xavier_uniform_(self.tgt_embed.weight)
        nn.init.normal_(self.level_embed)
        bias = -math.log((1 - 0.01) / 0.01)
        for c in self.class_embed:
            nn.init.constant_(c.bias, bias)
        for b in self.bbox_embed:
            nn.init.zeros_(b.layers[-1].weight)
            nn.init.zeros_(b.layers[-1].bias)

    def create_criterion(self, **kwargs) -> "FocusDETRCriterion":
        """The training loss for this model (kwargs override FocusDETRCriterion's defaults)."""
        return FocusDETRCriterion(self.num_classes, **kwargs)

    # -- timm-ish API --------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^backbone", blocks=[(r"^neck|^level_embed|^enc_output|^fts", (0,)),
                                               (r"^encoder\.(\d+)", None), (r"^decoder", (99,)),
                                               (r"^tgt_embed|^label_enc|^class_embed|^bbox_embed", (100,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def get_classifier(self):
        return self.class_embed

    def reset_classifier(self, num_classes: int, global_pool=None):
        """Re-head the detector for a new label set of ``num_classes`` classes: fresh class-logit
        layers for every decoder layer and for the two-stage proposals (the layer that also scores
        the encoder's OESM tokens) and a fresh denoising label embedding. Box heads and the
        class-agnostic foreground selector are kept. Build the loss again with
        :meth:`create_criterion` afterwards."""
        if global_pool not in (None, ""):
            raise UnsupportedError(f"reset_classifier(global_pool={global_pool!r}) asked of a detector, which has no "
                                   "global pooling; pass global_pool=None")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if num_classes == 0:
            raise UnsupportedError(
                "reset_classifier(0) asked of a detector: Focus-DETR ranks encoder tokens and picks its decoder "
                "queries by class logits, so it cannot run without classes; use features_only=True or "
                "forward_intermediates() for class-free multi-scale features")
        self._check_not_pruned("reset_classifier()")
        ref = self.label_enc.weight
        self.num_classes = num_classes
        self.label_enc = nn.Embedding(num_classes, self.embed_dim, device=ref.device, dtype=ref.dtype)
        self.class_embed = nn.ModuleList(nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                                         for _ in self.class_embed)
        bias = -math.log((1 - 0.01) / 0.01)
        for c in self.class_embed:
            nn.init.constant_(c.bias, bias)

    def _check_not_pruned(self, what: str):
        if self.decoder is None:
            raise UnsupportedError(f"{what} asked of a Focus-DETR pruned to its backbone and neck (features_only); "
                                   "use forward_intermediates(intermediates_only=True) for the neck maps, or build "
                                   "the full detector")

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Keep what ``forward_intermediates`` needs. Every neck level is computed together, so only
        the detector after the neck (encoder, decoder, heads) can go (``prune_head``)."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            for name in _DETECTOR_MODULES:
                setattr(self, name, None)
        return take

    # -- stages --------------------------------------------------------------------------------
    def forward_neck(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Backbone + neck: one (B, embed_dim, h, w) map per level (``feature_info``)."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        feats = self.backbone(images)
        if self.backbone_norms is not None:
            feats = [norm(f) for norm, f in zip(self.backbone_norms, feats)]
        if self._backbone_nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return self.neck(feats)

    def forward_intermediates(self, images: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, masks: Optional[torch.Tensor] = None):
        """Neck maps at ``indices`` of ``feature_info`` (strides ``self.strides``) and, unless
        ``intermediates_only``, the detector's output dict computed from the same maps."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        feats = self.forward_neck(images)
        inter = [feats[i] for i in take]
        if output_fmt == "NHWC":
            inter = [f.permute(0, 2, 3, 1) for f in inter]
        if intermediates_only:
            return inter
        self._check_not_pruned("forward_intermediates(intermediates_only=False)")
        return self.forward_detector(feats, *self._masks_and_pos(images, feats, masks)), inter

    def forward_features(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None):
        """Backbone + neck -> list of (B, C, h, w) maps, their padding masks and position embeddings."""
        feats = self.forward_neck(images)
        return (feats,) + self._masks_and_pos(images, feats, masks)[:2]

    def _masks_and_pos(self, images, feats, masks):
        """Per-level padding masks, position embeddings and whether any padding was given."""
        B, _, H, W = images.shape
        padded = masks is not None
        if masks is None:
            masks = torch.zeros(B, H, W, dtype=torch.bool, device=images.device)
        elif tuple(masks.shape) != (B, H, W):
            raise ValueError(f"masks must be (B, H, W) = {(B, H, W)} (True = padding), got {tuple(masks.shape)}")
        lvl_masks, pos = [], []
        for f in feats:
            m = F.interpolate(masks[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
            lvl_masks.append(m)
            pos.append(self.position_embedding(m).to(f.dtype))
        return lvl_masks, pos, padded

    @staticmethod
    def _valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        _, H, W = mask.shape
        vh = (~mask[:, :, 0]).sum(1).float() / H
        vw = (~mask[:, 0, :]).sum(1).float() / W
        return torch.stack([vw, vh], -1)

    @staticmethod
    def _encoder_reference_points(shapes, valid_ratios, device):
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device),
                                    torch.linspace(0.5, w - 0.5, w, device=device), indexing="ij")
            ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((rx, ry), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def _proposals(self, memory, padding_mask, shapes):
        """Per-token proposal boxes (unsigmoided; +inf where invalid) and the projected memory."""
        B = memory.shape[0]
        props, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = padding_mask[:, start:start + h * w].view(B, h, w)
            vh = (~m[:, :, 0]).sum(1)
            vw = (~m[:, 0, :]).sum(1)
            gy, gx = torch.meshgrid(torch.arange(h, device=memory.device, dtype=torch.float32),
                                    torch.arange(w, device=memory.device, dtype=torch.float32), indexing="ij")
            grid = torch.stack([gx, gy], -1)[None] + 0.5
            scale = torch.stack([vw, vh], -1).view(B, 1, 1, 2).float()
            grid = grid / scale
            wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
            props.append(torch.cat([grid, wh], -1).view(B, -1, 4))
            start += h * w
        props = torch.cat(props, 1)
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        invalid = padding_mask[..., None] | ~valid
        props = props.masked_fill(invalid, float("inf"))
        out = memory.masked_fill(invalid, 0.0)
        out = self.enc_output_norm(self.enc_output(out))
        return out, props

    def forward(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None) -> Dict[str, Any]:
        self._check_not_pruned("forward()")
        feats = self.forward_neck(images)
        return self.forward_detector(feats, *self._masks_and_pos(images, feats, masks), targets=targets)

    def forward_detector(self, feats: List[torch.Tensor], lvl_masks: List[torch.Tensor],
                         pos_embeds: List[torch.Tensor], padded: bool = True,
                         targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None) -> Dict[str, Any]:
        """Encoder, two-stage proposals and decoder on the neck maps (see :meth:`forward`).
        ``padded=False`` promises that ``lvl_masks`` are all False (counts then follow the shapes)."""
        B, C = feats[0].shape[:2]
        device = feats[0].device
        shapes = [tuple(f.shape[-2:]) for f in feats]
        if len(shapes) != self.num_levels:
            raise ValueError(f"got {len(shapes)} feature levels, model built for {self.num_levels}")
        feat_flat = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        mask_flat = torch.cat([m.flatten(1) for m in lvl_masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos_embeds)], 1)
        N = feat_flat.shape[1]
        # Python ints for the deformable attention: no device sync, traceable by compile / export
        spatial_shapes = shapes
        level_start_index = [0]
        for h, w in shapes[:-1]:
            level_start_index.append(level_start_index[-1] + h * w)
        valid_ratios = torch.stack([self._valid_ratios(m) for m in lvl_masks], 1)
        ref_points = self._encoder_reference_points(shapes, valid_ratios, device)

        # foreground token selection (one score map, nested top-k subsets)
        fts_memory, _ = self._proposals(feat_flat + pos_flat, mask_flat, shapes)
        fg_logits = self.fts(fts_memory, shapes)
        fg_for_topk, order, focus_nums, ks = select_foreground(fg_logits, mask_flat if padded else None, self.focus_rho,
                                                             self.cascade)

        mcsp = self.class_embed[len(self.decoder.layers)]
        output = feat_flat
        for li, layer in enumerate(self.encoder):
            k = ks[li]
            idx = order[:, :k]
            gi = idx[..., None].expand(-1, -1, C)
            q = output.gather(1, gi)
            qp = pos_flat.gather(1, gi)
            ref = ref_points.flatten(2).gather(1, idx[..., None].expand(-1, -1, ref_points.shape[2] * 2))
            ref = ref.view(B, k, self.num_levels, 2)
            fg = fg_for_topk.gather(1, idx)
            score = mcsp(q).max(-1).values * fg  # raw logits times raw logits, as upstream
            args = (q, qp, ref, score, feat_flat, spatial_shapes, level_start_index, mask_flat)
            if self.grad_checkpointing and torch.is_grad_enabled():
                q = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                q = layer(*args)
            # only each image's own budget of tokens is written back (batch-max k attends more)
            keep = torch.arange(k, device=q.device)[None] < focus_nums.to(q.device)[:, None]
            q = torch.where(keep[..., None], q, output.gather(1, gi))
            output = output.scatter(1, gi, q)
        memory = output

        # two-stage proposals
        out_mem, out_props = self._proposals(memory, mask_flat, shapes)
        nd = len(self.decoder.layers)
        enc_class = self.class_embed[nd](out_mem)
        enc_coord_unact = self.bbox_embed[nd](out_mem) + out_props
        nq = min(self.num_queries, N)
        topk_idx = enc_class.max(-1).values.topk(nq, dim=1).indices
        topk_coords_unact = enc_coord_unact.gather(1, topk_idx[..., None].expand(-1, -1, 4))
        enc_state = out_mem.gather(1, topk_idx[..., None].expand(-1, -1, C))
        reference = topk_coords_unact.detach().sigmoid()
        tgt = self.tgt_embed.weight[:nq][None].expand(B, -1, -1)

        dn = None
        if self.training and targets is not None:
            dn = build_cdn_queries(targets, self.dn_number, self.label_noise_ratio, self.box_noise_scale,
                                   self.num_classes, self.label_enc)
        layout = None
        if dn is not None:
            dn_label, dn_box, dn_meta = dn
            reference = torch.cat([dn_box.sigmoid(), reference], 1)
            tgt = torch.cat([dn_label.to(tgt.dtype), tgt], 1)
            mask = cdn_attn_mask(dn_meta["pad_size"], dn_meta["group_size"], nq, device=device)
            layout = _kernels.from_dense_mask(mask[None, None])

        states, refs = self._decode(tgt, reference, memory, spatial_shapes, level_start_index, mask_flat,
                                    valid_ratios, layout)
        init_ref = reference
        classes, coords = [], []
        for i in range(nd):
            r = init_ref if i == 0 else refs[i - 1]
            classes.append(self.class_embed[i](states[i]))
            coords.append((self.bbox_embed[i](states[i]) + inverse_sigmoid(r)).sigmoid())
        # keeps label_enc in the graph when no denoising queries were built (DDP)
        classes[0] = classes[0] + self.label_enc.weight[0, 0] * 0.0

        out: Dict[str, Any] = {}
        if dn is not None:
            p = dn_meta["pad_size"]
            dn_cls = [c[:, :p] for c in classes]
            dn_box_ = [c[:, :p] for c in coords]
            classes = [c[:, p:] for c in classes]
            coords = [c[:, p:] for c in coords]
            out["dn_outputs"] = dict(pred_logits=dn_cls[-1], pred_boxes=dn_box_[-1],
                                     aux_outputs=[dict(pred_logits=a, pred_boxes=b)
                                                  for a, b in zip(dn_cls[:-1], dn_box_[:-1])])
            out["dn_meta"] = dn_meta
        out.update(pred_logits=classes[-1], pred_boxes=coords[-1],
                   aux_outputs=[dict(pred_logits=a, pred_boxes=b) for a, b in zip(classes[:-1], coords[:-1])],
                   enc_outputs=dict(pred_logits=self.class_embed[nd](enc_state),
                                    pred_boxes=topk_coords_unact.sigmoid()),
                   fg_logits=fg_logits, spatial_shapes=shapes, strides=self.strides)
        return out

    def _decode(self, tgt, reference, memory, spatial_shapes, level_start_index, mask_flat, valid_ratios, layout):
        dec = self.decoder
        x = tgt
        states, refs = [], []
        vr = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for i, layer in enumerate(dec.layers):
            ref_in = reference[:, :, None] * vr
            pos = dec.ref_point_head(sine_box_embed(ref_in[:, :, 0, :], dec.dim // 2).to(x.dtype))
            args = (x, pos, ref_in, memory, spatial_shapes, level_start_index, mask_flat, layout)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
            new_ref = (self.bbox_embed[i](x) + inverse_sigmoid(reference)).sigmoid()
            states.append(dec.norm(x))
            refs.append(new_ref if self.look_forward_twice else new_ref.detach())
            reference = new_ref.detach()
        return states, refs

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def postprocess(self, outputs: Dict[str, Any], image_sizes: Sequence[Tuple[int, int]],
                    num_select: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        """Top-``num_select`` (query, class) pairs by sigmoid score -> boxes xyxy in pixels of
        each image's valid area (``image_sizes`` (h, w)), scores, labels."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, K = logits.shape
        k = min(num_select or self.num_select, Q * K)
        prob = logits.float().sigmoid().flatten(1)
        scores, idx = prob.topk(k, dim=1)
        q = torch.div(idx, K, rounding_mode="floor")
        labels = idx % K
        b = box_cxcywh_to_xyxy(boxes.float().gather(1, q[..., None].expand(-1, -1, 4)))
        res = []
        for i, (h, w) in enumerate(image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=b.dtype, device=b.device)
            res.append(dict(boxes=b[i] * scale, scores=scores[i], labels=labels[i]))
        return res


class FocusDETRCriterion(nn.Module):
    """DINO set losses on the final, auxiliary, encoder-proposal and denoising outputs plus the
    foreground-supervision loss of the FTS logits (binary focal, normalised per image by its
    number of positives, FCOS-style level ranges)."""

    def __init__(self, num_classes: int, cost_class: float = 2., cost_bbox: float = 5., cost_giou: float = 2.,
                 weight_class: float = 1., weight_bbox: float = 5., weight_giou: float = 2.,
                 weight_fg: float = 1.5, focal_alpha: float = 0.25, focal_gamma: float = 2.,
                 fg_ranges: Sequence[Sequence[float]] = ((-1, 64), (64, 128), (128, 256), (256, 1e8))):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma)
        self.weights = dict(loss_class=weight_class, loss_bbox=weight_bbox, loss_giou=weight_giou)
        self.weight_fg = weight_fg
        self.alpha = focal_alpha
        self.gamma = focal_gamma
        self.fg_ranges = tuple(tuple(r) for r in fg_ranges)

    def _weighted(self, losses, suffix=""):
        return {k + suffix: v * self.weights[k] for k, v in losses.items()}

    def forward(self, outputs: Dict[str, Any], targets: Sequence[Dict[str, torch.Tensor]],
                image_sizes: Sequence[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """targets: labels (n,), boxes (n, 4) cxcywh normalised to the valid area; image_sizes (h, w)."""
        dev = outputs["pred_logits"].device
        num_boxes = max(float(sum(int(t["labels"].numel()) for t in targets)), 1.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            nb = torch.tensor([num_boxes], device=dev)
            torch.distributed.all_reduce(nb)
            num_boxes = max(float(nb) / torch.distributed.get_world_size(), 1.0)
        losses = {}

        def add(out, suffix):
            idx = self.matcher(out["pred_logits"], out["pred_boxes"], targets)
            losses.update(self._weighted(set_losses(out["pred_logits"], out["pred_boxes"], targets, idx,
                                                    num_boxes, self.alpha, self.gamma), suffix))

        add(outputs, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            add(aux, f"_{i}")
        if "enc_outputs" in outputs:
            add(outputs["enc_outputs"], "_enc")
        if "dn_outputs" in outputs:
            meta = outputs["dn_meta"]
            idx = dn_match_indices(targets, meta)
            dn = outputs["dn_outputs"]
            nb = num_boxes * meta["groups"]
            for suffix, o in [("_dn", dn)] + [(f"_dn_{i}", a) for i, a in enumerate(dn["aux_outputs"])]:
                losses.update(self._weighted(set_losses(o["pred_logits"], o["pred_boxes"], targets, idx, nb,
                                                        self.alpha, self.gamma), suffix))
        if "fg_logits" in outputs and self.weight_fg > 0:
            losses["loss_fg"] = self.weight_fg * self.foreground_loss(outputs, targets, image_sizes)
        return losses

    def foreground_loss(self, outputs, targets, image_sizes):
        fg = outputs["fg_logits"]
        boxes = []
        for t, (h, w) in zip(targets, image_sizes):
            b = t["boxes"].float() * torch.tensor([w, h, w, h], dtype=torch.float32, device=t["boxes"].device)
            boxes.append(box_cxcywh_to_xyxy(b))
        tgt = foreground_targets(outputs["spatial_shapes"], outputs["strides"], self.fg_ranges, boxes, fg.device)
        loss = sigmoid_focal_loss(fg.float(), tgt, alpha=self.alpha, gamma=self.gamma, reduction="none").sum(1)
        return (loss / tgt.sum(1).clamp(min=1)).mean()


# ------------------------------------------------------------------------------------------------
# checkpoint conversion
# ------------------------------------------------------------------------------------------------
_D2_RESNET = [
    (r"^backbone\.stem\.conv1\.norm\.", "backbone.bn1."),
    (r"^backbone\.stem\.conv1\.", "backbone.conv1."),
    (r"^backbone\.res(\d)\.(\d+)\.shortcut\.norm\.", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (r"^backbone\.res(\d)\.(\d+)\.shortcut\.", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0."),
    (r"^backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"^backbone\.res(\d)\.(\d+)\.conv(\d)\.", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
]
# detectron2 SwinTransformer: each stage's PatchMerging ends it there and starts the next stage in timm;
# the per-output LayerNorms norm{i} are handled in checkpoint_filter_fn (numbered by stage, kept in order)
_D2_SWIN = [
    (r"^backbone\.layers\.(\d+)\.downsample\.", lambda m: f"backbone.layers_{int(m[1]) + 1}.downsample."),
    (r"^backbone\.layers\.(\d+)\.blocks\.", r"backbone.layers_\1.blocks."),
]
_DETREX = [
    (r"^transformer\.level_embeds$", "level_embed"),
    (r"^transformer\.alpha$", "fts.alpha"),
    (r"^transformer\.enc_mask_predictor\.", "fts.mask_predictor."),
    (r"^transformer\.tgt_embed\.", "tgt_embed."),
    (r"^transformer\.enc_output_norm\.", "enc_output_norm."),
    (r"^transformer\.enc_output\.", "enc_output."),
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"encoder.\1.oesm.attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.\1.oesm.norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.1\.", r"encoder.\1.cross_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.0\.", r"encoder.\1.norm1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.1\.", r"encoder.\1.norm2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"encoder.\1.ffn.fc1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"encoder.\1.ffn.fc2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"decoder.layers.\1.ffn.fc1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"decoder.layers.\1.ffn.fc2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"decoder.layers.\1.self_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.1\.", r"decoder.layers.\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.(\d)\.", lambda m: f"decoder.layers.{m[1]}.norm{int(m[2]) + 1}."),
    (r"^transformer\.decoder\.ref_point_head\.", "decoder.ref_point_head."),
    (r"^transformer\.decoder\.norm\.", "decoder.norm."),
]
# aliases of the shared heads that detrex registers again: the decoder's copies of the heads and the
# encoder's MCSP list (every entry is the two-stage class head, kept both on the encoder and on the detector)
_ALIASES = (r"^transformer\.decoder\.(class|bbox)_embed\.", r"^transformer\.encoder\.enhance_MCSP\.",
            r"^enhance_MCSP_layerlist\.")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[FocusDETR] = None):
    """detrex / detectron2 Focus-DETR checkpoint -> this module's keys.

    Unwraps ``{"model": ...}``, maps detectron2 ResNet names to timm's and detectron2 SwinTransformer
    names to timm's Swin features (``layers.<i>.downsample`` -> ``layers_<i+1>.downsample``, the
    output norms ``norm<i>`` -> ``backbone_norms.<n>`` in stage order, ``relative_position_index``
    buffers dropped), detrex transformer names to ours, and drops the aliased copies of the shared
    heads (checking they equal the originals): the decoder's ``class_embed`` / ``bbox_embed`` and
    the MCSP lists ``enhance_MCSP_layerlist`` / ``transformer.encoder.enhance_MCSP``, whose entries
    are all the two-stage class head ``class_embed.<dec_layers>``. Already-converted state dicts
    pass through. Checked against the layouts detrex builds for its R50, R101, Swin-T and
    Swin-B-384 configs.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if not any(k.startswith(("transformer.", "backbone.stem.", "backbone.res")) for k in state_dict):
        return _drop_mismatched_classifier(state_dict, model)
    swin_norms = sorted({int(m[1]) for k in state_dict for m in [re.match(r"^backbone\.norm(\d+)\.", k)] if m})
    out = {}
    for k, v in state_dict.items():
        if any(re.match(a, k) for a in _ALIASES) or k.endswith(".relative_position_index"):
            continue
        m = re.match(r"^backbone\.norm(\d+)\.(.*)$", k)
        if m:
            out[f"backbone_norms.{swin_norms.index(int(m[1]))}.{m[2]}"] = v
            continue
        nk = k
        for pat, rep in _D2_RESNET + _D2_SWIN + _DETREX:
            new = re.sub(pat, rep, nk)
            if new != nk:
                nk = new
                break
        out[nk] = v
    heads = [int(m[1]) for k in out for m in [re.match(r"^class_embed\.(\d+)\.", k)] if m]
    two_stage = max(heads, default=None)
    for k, v in state_dict.items():
        m = re.match(r"^transformer\.decoder\.(class|bbox)_embed\.(.*)$", k)
        if m:
            orig = f"{m[1]}_embed.{m[2]}"
        else:
            m = re.match(r"^(?:transformer\.encoder\.enhance_MCSP|enhance_MCSP_layerlist)\.\d+\.(.*)$", k)
            orig = f"class_embed.{two_stage}.{m[1]}" if m and two_stage is not None else None
        if orig is not None and orig in out and v.device.type != "meta" and not torch.equal(out[orig], v):
            raise ValueError(f"checkpoint alias {k} differs from {orig}; the heads are meant to be shared")
    return _drop_mismatched_classifier(out, model)


def _drop_mismatched_classifier(state_dict, model):
    """A model built for another class count keeps its fresh class heads and label embedding
    (timm only drops ``<classifier>.weight``, not ModuleList entries)."""
    if model is None or "class_embed.0.weight" not in state_dict:
        return state_dict
    if state_dict["class_embed.0.weight"].shape[0] == model.num_classes:
        return state_dict
    return {k: v for k, v in state_dict.items() if not k.startswith(("class_embed.", "label_enc."))}


# ------------------------------------------------------------------------------------------------
# cfgs and entry points
# ------------------------------------------------------------------------------------------------
_REL = "https://github.com/linxid/Focus-DETR-mindspore/releases/download/Focus-DETR/"


def _cfg(url: str = "", **kwargs):
    notes = tuple(kwargs.pop("notes", ()))
    base = dict(
        license="apache-2.0", paper_ids="arXiv:2307.12612",
        paper_name="Less is More: Focus Attention for Efficient DETR",
        origin_url="https://github.com/IDEA-Research/detrex/tree/main/projects/focus_detr",
        num_classes=80, input_size=(3, 800, 1333), fixed_input_size=False, pool_size=None, crop_pct=1.0,
        interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="backbone.conv1", classifier=("class_embed", "label_enc"))
    base.update(kwargs)
    if notes:
        base["notes"] = notes
    if not url:
        return hub_cfg(**base)
    return hub_cfg(url=url, sha256=None, **base)


default_cfgs = generate_default_cfgs({
    "focus_detr_r50.detrex_coco_12ep": _cfg(_REL + "focus_detr_r50_4scale_12ep.zip"),
    "focus_detr_r50.detrex_coco_24ep": _cfg(_REL + "focus_detr_r50_4scale_24ep.zip"),
    "focus_detr_r50.detrex_coco_36ep": _cfg(_REL + "focus_detr_r50_4scale_36ep_v3.zip"),
    "focus_detr_r101.detrex_coco_12ep": _cfg(_REL + "focus_detr_r101_4scale_12ep.zip"),
    "focus_detr_r101.detrex_coco_24ep": _cfg(_REL + "focus_detr_r101_4scale_24ep.zip"),
    "focus_detr_r101.detrex_coco_36ep": _cfg(_REL + "focus_detr_r101_4scale_36ep_v2.zip"),
    "focus_detr_swin_tiny.detrex_coco_12ep": _cfg(_REL + "focus_detr_swin_tiny_224_4scale_12ep.zip"),
    "focus_detr_swin_tiny.detrex_coco_24ep": _cfg(_REL + "focus_detr_swin_tiny_224_4scale_24ep.zip"),
    # upstream's README links the 36-epoch row (52.5 AP) to a file named "..._12ep.pth"
    "focus_detr_swin_tiny.detrex_coco_36ep": _cfg(
        "https://github.com/IDEA-Research/detrex-storage/releases/download/v0.1.1/"
        "focus_detr_swin_tiny_224_4scale_12ep.pth",
        notes=("upstream README links this 36-epoch row to a file named *_12ep.pth (likely mislabelled); "
               "unverified which schedule it holds",)),
    "focus_detr_swin_base_384.detrex_in22k_coco_36ep": _cfg(_REL + "focus_detr_swin_base_384_4scale_22k_36ep.pth"),
    "focus_detr_tiny.untrained": _cfg(input_size=(3, 128, 128), num_classes=10),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> FocusDETR:
    # features_only: the neck maps through forward_intermediates, every level by default
    levels = tuple(range(kwargs.get("num_levels", 4)))
    return build_model(FocusDETR, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                       feature_cfg=dict(feature_cls="getter", out_indices=levels), **kwargs)


def _swin_kwargs(name: str, img_size: int) -> Dict[str, Any]:
    # as detectron2's SwinTransformer: any image size (padded to whole patches, then to whole windows
    # before each shift), every stage shifts its windows (always_partition, also where the pretraining
    # grid is no larger than a window), and each output level has its own LayerNorm
    return dict(backbone=name, backbone_out_indices=(1, 2, 3), backbone_freeze_at=0, frozen_bn=False,
                backbone_norm=True, swin_pad_first=True,
                backbone_kwargs=dict(img_size=img_size, strict_img_size=False, always_partition=True,
                                     embed_layer=partial(PatchEmbed, dynamic_img_pad=True)))


@register_model
def focus_detr_r50(pretrained: bool = False, **kwargs) -> FocusDETR:
    """Focus-DETR, ResNet-50 (torchvision weights, frozen BN), 4 scales, 6+6 layers, 900 queries."""
    return _create("focus_detr_r50", pretrained, **dict(dict(backbone="resnet50.tv_in1k"), **kwargs))


@register_model
def focus_detr_r101(pretrained: bool = False, **kwargs) -> FocusDETR:
    """Focus-DETR, ResNet-101."""
    return _create("focus_detr_r101", pretrained, **dict(dict(backbone="resnet101.tv_in1k"), **kwargs))


@register_model
def focus_detr_swin_tiny(pretrained: bool = False, **kwargs) -> FocusDETR:
    """Focus-DETR, Swin-T (224, window 7) backbone with a LayerNorm per output level."""
    return _create("focus_detr_swin_tiny", pretrained,
                   **dict(_swin_kwargs("swin_tiny_patch4_window7_224", 224), **kwargs))


@register_model
def focus_detr_swin_base_384(pretrained: bool = False, **kwargs) -> FocusDETR:
    """Focus-DETR, Swin-B (384, window 12) backbone with a LayerNorm per output level."""
    return _create("focus_detr_swin_base_384", pretrained,
                   **dict(_swin_kwargs("swin_base_patch4_window12_384", 384), **kwargs))


@register_model
def focus_detr_tiny(pretrained: bool = False, **kwargs) -> FocusDETR:
    """Small Focus-DETR for CPU tests and the embedded digits set: timm ``test_resnet`` features,
    d_model 64, 2+2 layers, 100 queries."""
    base = dict(backbone="test_resnet", backbone_freeze_at=0, embed_dim=64, num_heads=4, ffn_dim=128,
                num_points=2, enc_layers=2, dec_layers=2, gn_groups=8, num_queries=100, num_select=100,
                cascade=(1.0, 0.6), topk_sa=64, dn_number=20, num_classes=10)
    return _create("focus_detr_tiny", pretrained, **dict(base, **kwargs))
