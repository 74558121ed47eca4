# SPDX-License-Identifier: Apache-2.0
# Derived from IDEA-Research/detrex (Apache-2.0; Copyright 2022 - present, IDEA, Inc); see THIRD_PARTY_NOTICES.md
# Derived from fundamentalvision/Deformable-DETR (Apache-2.0; Copyright (c) 2020 SenseTime. All Rights Reserved); see THIRD_PARTY_NOTICES.md
"""Building blocks shared by DETR-family detectors (Deformable-DETR / DINO lineage).

Box helpers, sine position embeddings (2-D maps and box coordinates), the MLP / FFN heads, the
Hungarian matcher, the set-prediction losses (sigmoid focal class loss, L1, GIoU) and DINO's
contrastive denoising (CDN) query builder. Boxes are ``(cx, cy, w, h)`` normalised to the valid
(unpadded) image unless a name says ``xyxy``.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

__all__ = [
    "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "inverse_sigmoid", "PositionEmbeddingSine",
    "sine_box_embed", "MLP", "FFN", "HungarianMatcher", "set_losses", "build_cdn_queries",
    "cdn_attn_mask", "dn_match_indices",
]


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return box_convert(b, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    return box_convert(b, "xyxy", "cxcywh")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) clamped so that 0 and 1 map to finite values (eps 1e-3 as in detrex, whose weights
    were trained with it)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class PositionEmbeddingSine(nn.Module):
    """DETR sine embedding of a padded feature map: (B, H, W) padding mask -> (B, 2F, H, W).

    Coordinates are the running count of valid pixels, so padding does not shift them. With
    ``normalize`` they are ``(count + offset) / (total + eps) * scale``; detrex's 12-epoch configs
    use temperature 10000 / offset -0.5, the 24/36-epoch ones temperature 20 / offset 0.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000., normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0., eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        valid = (~mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        px = x[..., None] / dim_t
        py = y[..., None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def sine_box_embed(coords: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.,
                   exchange_xy: bool = True) -> torch.Tensor:
    """Sine embedding of normalised coordinates (..., n) -> (..., n * num_pos_feats).

    With ``exchange_xy`` the first two coordinates are emitted as (y, x) (DAB/DINO convention).
    """
    scale = 2 * math.pi
    i = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_pos_feats)

    def one(c):
        p = c[..., None] * scale / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [one(c) for c in coords.float().unbind(-1)]
    if exchange_xy and len(parts) >= 2:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (DETR box head / query-pos head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FFN(nn.Module):
    """Transformer feed-forward block with residual: ``x + fc2(drop(act(fc1(x))))``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


# ------------------------------------------------------------------------------------------------
# matching and losses
# ------------------------------------------------------------------------------------------------
class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising the DINO matching cost
    ``cost_class * focal(class) + cost_bbox * L1(box) + cost_giou * (-GIoU)``."""

    def __init__(self, cost_class: float = 2., cost_bbox: float = 5., cost_giou: float = 2.,
                 alpha: float = 0.25, gamma: float = 2.):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def forward(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                targets: Sequence[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        from zoo._extras import requires_extra
        with requires_extra("detection", "Hungarian matching"):
            from scipy.optimize import linear_sum_assignment

        B, Q, _ = pred_logits.shape
        out = []
        for b in range(B):
            labels, boxes = targets[b]["labels"], targets[b]["boxes"]
            if labels.numel() == 0:
                e = torch.zeros(0, dtype=torch.int64)
                out.append((e, e))
                continue
            p = pred_logits[b].float().sigmoid()[:, labels]
            neg = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
            pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
            pb = pred_boxes[b].float()
            cost = (self.cost_class * (pos - neg) + self.cost_bbox * torch.cdist(pb, boxes.float(), p=1)
                    - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(boxes.float())))
            cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
            i, j = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out


def set_losses(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]],
               indices: Sequence[Tuple[torch.Tensor, torch.Tensor]], num_boxes: float,
               alpha: float = 0.25, gamma: float = 2.) -> Dict[str, torch.Tensor]:
    """Focal class loss over all queries (unmatched -> background) plus L1 and GIoU on matched
    pairs, each summed and divided by ``num_boxes`` (DETR normalisation)."""
    B, Q, C = pred_logits.shape
    dev = pred_logits.device
    onehot = torch.zeros(B, Q, C, device=dev, dtype=pred_logits.dtype)
    bi = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(indices)]).to(dev)
    si = torch.cat([s for s, _ in indices]).to(dev)
    tl = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]).to(dev)
    if si.numel():
        onehot[bi, si, tl] = 1.0
    loss_class = sigmoid_focal_loss(pred_logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes
    if si.numel():
        src = pred_boxes[bi, si]
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
    else:  # keep the graph connected so every head gets a (zero) gradient
        loss_bbox = pred_boxes.sum() * 0.0
        loss_giou = pred_boxes.sum() * 0.0
    return dict(loss_class=loss_class, loss_bbox=loss_bbox, loss_giou=loss_giou)


# ------------------------------------------------------------------------------------------------
# contrastive denoising (DINO)
# ------------------------------------------------------------------------------------------------
def cdn_attn_mask(pad_size: int, group_size: int, num_queries: int, device=None) -> torch.Tensor:
    """Decoder self-attention mask, True = attend, for ``pad_size`` denoising queries (groups of
    ``group_size``) followed by ``num_queries`` matching queries: matching queries never see
    denoising ones, a denoising group sees itself and the matching queries."""
    n = pad_size + num_queries
    grp = torch.full((n,), -1, dtype=torch.int64, device=device)
    if pad_size:
        grp[:pad_size] = torch.arange(pad_size, device=device) // group_size
    same = grp[:, None] == grp[None, :]
    to_matching = (grp[None, :] < 0).expand(n, n)
    return same | to_matching


def build_cdn_queries(targets: Sequence[Dict[str, torch.Tensor]], dn_number: int, label_noise_ratio: float,
                      box_noise_scale: float, num_classes: int, label_enc: nn.Embedding,
                      generator: Optional[torch.Generator] = None):
    """DINO contrastive denoising queries.

    Every ground-truth box gets ``groups`` positive and negative noised copies; per group the
    batch is padded to ``2 * max_gt`` slots (positives first, then negatives). Positives jitter
    corners by up to ``box_noise_scale * half size``, negatives by 1-2x that; a
    ``label_noise_ratio / 2`` fraction of labels is flipped to a random class.

    Returns ``(query_label (B, pad, C), query_box_unact (B, pad, 4), meta)`` or ``None`` when no
    image has a box or ``dn_number <= 0``. ``meta``: pad_size, group_size, groups.
    """
    if dn_number <= 0:
        return None
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts) if counts else 0
    if max_gt == 0:
        return None
    device = label_enc.weight.device
    groups = max(1, (2 * dn_number) // (2 * max_gt))
    group_size = 2 * max_gt
    pad_size = groups * group_size
    B = len(targets)
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
    bid = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(counts)]).to(device)
    slot = torch.cat([torch.arange(n) for n in counts]).to(device)
    n = labels.numel()
    # (groups, 2 (pos/neg), n)
    lab = labels.repeat(groups, 2, 1)
    box = boxes.repeat(groups, 2, 1, 1)
    rand = (lambda *s: torch.rand(*s, device=device, generator=generator))
    if label_noise_ratio > 0:
        flip = rand(groups, 2, n) < label_noise_ratio * 0.5
        new = torch.randint(0, num_classes, (groups, 2, n), device=device, generator=generator)
        lab = torch.where(flip, new, lab)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(box)
        half = box[..., 2:].repeat(1, 1, 1, 2) / 2
        sign = rand(groups, 2, n, 4).lt(0.5).float() * 2 - 1
        mag = rand(groups, 2, n, 4)
        mag[:, 1] += 1.0
        xyxy = (xyxy + sign * mag * half * box_noise_scale).clamp(0.0, 1.0)
        box = box_xyxy_to_cxcywh(xyxy)
    q_label = torch.zeros(B, pad_size, label_enc.embedding_dim, device=device)
    q_box = torch.zeros(B, pad_size, 4, device=device)
    g = torch.arange(groups, device=device)[:, None, None]
    s = torch.arange(2, device=device)[None, :, None]
    pos = (g * group_size + s * max_gt + slot[None, None]).reshape(-1)
    bb = bid[None, None].expand(groups, 2, n).reshape(-1)
    q_label[bb, pos] = label_enc(lab.reshape(-1))
    q_box[bb, pos] = inverse_sigmoid(box.reshape(-1, 4))
    meta = dict(pad_size=pad_size, group_size=group_size, groups=groups, max_gt=max_gt)
    return q_label, q_box, meta


def dn_match_indices(targets: Sequence[Dict[str, torch.Tensor]], meta: dict):
    """Fixed assignment of the positive denoising queries to their ground truths."""
    out = []
    for t in targets:
        n = int(t["labels"].numel())
        if n == 0:
            e = torch.zeros(0, dtype=torch.int64)
            out.append((e, e))
            continue
        j = torch.arange(n).repeat(meta["groups"])
        i = (torch.arange(meta["groups"])[:, None] * meta["group_size"] + torch.arange(n)[None]).reshape(-1)
        out.append((i, j))
    return out
