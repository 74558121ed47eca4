# SPDX-License-Identifier: Apache-2.0
# Derived from Seed3D/Puppeteer (Apache-2.0; Copyright (c) 2025 Bytedance Ltd. and/or its affiliates); see THIRD_PARTY_NOTICES.md
"""Puppeteer: "Rig and Animate Your 3D Models" (Song et al., NeurIPS 2025, arXiv 2508.10898).

Two attention networks of the rigging pipeline, on ``zoo.kernels.attention``:

* :class:`PuppeteerSkinNet` - skinning weights. Points (Fourier embedding, optionally plus
  projected PartField features) and joints (Fourier embedding of [parent xyz, joint xyz]) are
  refined by skinning blocks: joint self-attention with the topology-aware hop-distance bias
  (TAJA, an ``IndexedBias``), point->shape, joint->shape, joint->point and point->joint
  attention, each followed by a GEGLU FFN, all pre-norm with residuals. Weights are a softmax
  over joints of ``(|scale| + 1e-9) * cos(point, joint)``.
* :class:`PuppeteerSkeletonGPT` - skeleton generation. A post-LN OPT decoder (causal layout
  with a KV cache) reads a 257-token shape condition and emits joints as 4 tokens each
  (x, y, z in 128 bins, parent index), with slot, condition-type and target-aware position rows.

The shape encoder (Michelangelo) and the PartField point features are out of scope: the models
take their outputs as input tensors (``shape`` tokens and ``point_feats``). The small variants
instead embed raw shape points with their own Fourier embedding (``shape_in_chans=6``).
Training code is not public upstream; see zoo/tasks/rigging.py for the loss used here.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint as _checkpoint

import zoo.kernels as _kernels
from zoo.errors import NoClassifierApi, NoImageDataConfig, NotScriptable, UnsupportedError
from zoo.hub import cfg as hub_cfg
from zoo.models._builder import build_model
from zoo.layers.joint_attention import (HOP_CLIP, MaskedAttention, PointEmbed, PreNorm, TopologyBias, geglu_mlp,
                                        hop_bias_index, joint_hop_distance)

__all__ = ["SkinningBlock", "PuppeteerSkinNet", "OPTDecoderLayer", "SkeletonDecoder", "PuppeteerSkeletonGPT",
           "skeleton_input", "tokenize_skeleton", "detokenize_skeleton", "checkpoint_filter_fn",
           "BOS", "EOS", "PAD", "NUM_SPECIAL"]

BOS, EOS, PAD = 0, 1, 2
NUM_SPECIAL = 3


# ------------------------------------------------------------------------------------------------
# skinning
# ------------------------------------------------------------------------------------------------
def skeleton_input(joints: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) joint positions + (B, N) parents (-1 root / padded) -> (B, N, 6) [parent xyz, joint xyz];
    a root's parent position is its own (upstream's convention)."""
    idx = torch.where(parents >= 0, parents, torch.arange(parents.shape[-1], device=parents.device)).long()
    par = torch.gather(joints, -2, idx[..., None].expand(*idx.shape, 3))
    return torch.cat([par, joints], dim=-1)


class SkinningBlock(nn.Module):
    """One skinning block (upstream ``SkinningBlock``); sub-module names follow upstream's keys."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4, use_taja: bool = True,
                 hop_clip: int = HOP_CLIP):
        super().__init__()

        def attn():
            return PreNorm(dim, MaskedAttention(dim, dim, heads, dim_head), context_dim=dim)

        def ff():
            return PreNorm(dim, geglu_mlp(dim, ff_mult))

        self.self_attn_j, self.ff_j = attn(), ff()
        self.cross_attn_ps, self.ff_ps = attn(), ff()
        self.cross_attn_js, self.ff_js = attn(), ff()
        self.cross_attn_jp, self.ff_jp = attn(), ff()
        self.cross_attn_pj, self.ff_pj = attn(), ff()
        self.taja = TopologyBias(dim, heads, hop_clip) if use_taja else None

    def forward(self, point: torch.Tensor, joint: torch.Tensor, shape: torch.Tensor,
                valid: Optional[torch.Tensor] = None, bias_index: Optional[torch.Tensor] = None,
                reference_padding: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        bias = self.taja(bias_index) if self.taja is not None else None
        j = joint + self.self_attn_j(joint, context=joint, key_valid=valid, bias=bias)
        j = j + self.ff_j(j)
        p = point + self.cross_attn_ps(point, context=shape)
        p = p + self.ff_ps(p)
        j = j + self.cross_attn_js(j, context=shape, query_valid=valid, uniform_padded_queries=reference_padding)
        j = j + self.ff_js(j)
        j = j + self.cross_attn_jp(j, context=p, query_valid=valid, uniform_padded_queries=reference_padding)
        j = j + self.ff_jp(j)
        p = p + self.cross_attn_pj(p, context=j, key_valid=valid)
        p = p + self.ff_pj(p)
        return p, j


class PuppeteerSkinNet(NoClassifierApi, NotScriptable, nn.Module):
    """Puppeteer skinning network (upstream ``SkinningNetStacked`` without its frozen encoders).

    Args:
        dim: token width (768). heads / dim_head: 8 x 64 (inner 512 != dim). depth: blocks (1 or 2).
        part_dim: width of per-point PartField features fed through ``proj`` (448; 0 = none).
        shape_in_chans: None = ``shape`` is already (B, Ns, dim) encoder tokens (Michelangelo's 257);
            an int = ``shape`` holds raw (B, Ns, shape_in_chans) points embedded by ``shape_embed``.
        use_taja: topology-aware bias in the joint self-attention. hop_clip: 9.
        reference_padding: upstream's handling of padded joints (True, needed to reproduce the released
            weights' raw outputs): padded query rows of the joint->shape / joint->point attention become
            the uniform average of V and the final softmax runs over every joint column, padded ones
            included. False: padded rows give 0 and padded columns get weight 0.
    """
    _supported_calls = ("forward(**model.example_inputs()) (skinning weights) or forward_features() (point and "
                        "joint tokens)")

    def __init__(self, dim: int = 768, depth: int = 1, heads: int = 8, dim_head: int = 64, ff_mult: int = 4,
                 part_dim: int = 448, shape_in_chans: Optional[int] = None, use_taja: bool = True,
                 hop_clip: int = HOP_CLIP, reference_padding: bool = True, scale_init: float = 1.0,
                 embed_hidden: int = 48):
        super().__init__()
        self.dim, self.depth, self.hop_clip = dim, depth, hop_clip
        self.part_dim, self.shape_in_chans = part_dim, shape_in_chans
        self.reference_padding = reference_padding
        self.num_features = self.head_hidden_size = dim
        self.num_classes = 0
        self.grad_checkpointing = False
        self.skeleton_condition = PointEmbed(embed_hidden, dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.point_embed_pe = PointEmbed(embed_hidden, dim)
        self.proj = nn.Sequential(nn.Linear(part_dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if part_dim else None
        self.shape_embed = PointEmbed(embed_hidden, dim, in_chans=shape_in_chans) if shape_in_chans else None
        self.blocks = nn.ModuleList(SkinningBlock(dim, heads, dim_head, ff_mult, use_taja, hop_clip)
                                    for _ in range(depth))
        self.use_taja = use_taja

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"scale"} | {f"blocks.{i}.taja.rel_pos_scale" for i in range(self.depth)}

    @torch.jit.ignore
    def example_inputs(self, batch_size: int = 1, device=None, dtype=None, num_points: int = 8192,
                       num_joints: int = 64, shape_tokens: int = 257) -> Dict[str, torch.Tensor]:
        """Random ``forward`` keyword inputs for ``batch_size`` shapes (benchmarks, export). Defaults
        are upstream's sizes: 8192 surface points, 257 shape tokens (raw shape points for a model
        with ``shape_in_chans``); 64 joints (upstream rigs up to 70) in a binary tree."""
        for k, v in (("batch_size", batch_size), ("num_points", num_points), ("num_joints", num_joints),
                     ("shape_tokens", shape_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"example_inputs: {k} must be an int >= 1, got {v!r}")
        dtype = dtype or torch.float32
        B, kw = batch_size, dict(device=device, dtype=dtype)
        normals = F.normalize(torch.randn(B, num_points, 3, **kw), dim=-1)
        points = torch.cat([torch.rand(B, num_points, 3, **kw) - 0.5, normals], dim=-1)
        parents = (torch.arange(num_joints, device=device) - 1).div(2, rounding_mode="floor").expand(B, -1)
        joints = skeleton_input(torch.rand(B, num_joints, 3, **kw) * 0.9 - 0.45, parents)
        shape = torch.randn(B, shape_tokens, self.shape_in_chans or self.dim, **kw)
        out = dict(points=points, joints=joints, shape=shape,
                   joint_valid=torch.ones(B, num_joints, dtype=torch.bool, device=device), parents=parents)
        if self.proj is not None:
            out["point_feats"] = torch.randn(B, num_points, self.part_dim, **kw)
        return out

    def _check(self, points, joints, shape, joint_valid, point_feats):
        if points.dim() != 3 or points.shape[-1] != 6:
            raise ValueError(f"points must be (B, Np, 6) xyz + normal, got {tuple(points.shape)}")
        if joints.dim() != 3 or joints.shape[-1] != 6:
            raise ValueError(f"joints must be (B, Nj, 6) [parent xyz, joint xyz] (see skeleton_input), "
                             f"got {tuple(joints.shape)}")
        want = self.shape_in_chans or self.dim
        if shape.dim() != 3 or shape.shape[-1] != want:
            kind = "raw shape points" if self.shape_in_chans else "shape-encoder tokens"
            raise ValueError(f"shape must be (B, Ns, {want}) {kind}, got {tuple(shape.shape)}")
        if joint_valid is not None and tuple(joint_valid.shape) != tuple(joints.shape[:2]):
            raise ValueError(f"joint_valid must be (B, Nj) = {tuple(joints.shape[:2])}, got {tuple(joint_valid.shape)}")
        if self.proj is not None and (point_feats is None or point_feats.shape[-1] != self.part_dim):
            raise ValueError(f"this model needs point_feats (B, Np, {self.part_dim}) (PartField features), got "
                             f"{None if point_feats is None else tuple(point_feats.shape)}")

    def bias_index(self, joints_valid: Optional[torch.Tensor], parents: Optional[torch.Tensor],
                   hop_dist: Optional[torch.Tensor], B: int, N: int, device) -> torch.Tensor:
        if hop_dist is None:
            if parents is None:
                raise ValueError("the TAJA bias needs parents (B, Nj) or hop_dist (B, Nj, Nj)")
            hop_dist = joint_hop_distance(parents, joints_valid, max_hops=self.hop_clip)
        if tuple(hop_dist.shape) != (B, N, N):
            raise ValueError(f"hop_dist must be (B, Nj, Nj) = ({B}, {N}, {N}), got {tuple(hop_dist.shape)}")
        return hop_bias_index(hop_dist.float(), joints_valid, self.hop_clip)

    def forward_features(self, points: torch.Tensor, joints: torch.Tensor, shape: torch.Tensor,
                         joint_valid: Optional[torch.Tensor] = None, parents: Optional[torch.Tensor] = None,
                         hop_dist: Optional[torch.Tensor] = None,
                         point_feats: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Final point (B, Np, dim) and joint (B, Nj, dim) tokens."""
        self._check(points, joints, shape, joint_valid, point_feats)
        B, N = joints.shape[:2]
        valid = joint_valid.bool() if joint_valid is not None else None
        p = self.point_embed_pe(points)
        if self.proj is not None:
            p = p + self.proj(point_feats)
        j = self.skeleton_condition(joints)
        s = self.shape_embed(shape) if self.shape_embed is not None else shape
        index = self.bias_index(valid, parents, hop_dist, B, N, joints.device) if self.use_taja else None
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                p, j = _checkpoint(blk, p, j, s, valid, index, self.reference_padding)
            else:
                p, j = blk(p, j, s, valid, index, self.reference_padding)
        return p, j

    def forward_head(self, point: torch.Tensor, joint: torch.Tensor, joint_valid: Optional[torch.Tensor] = None,
                     log: bool = False, mask_padded: Optional[bool] = None) -> torch.Tensor:
        """Scaled cosine similarity -> softmax over joints (skinning-weight normalisation).
        ``mask_padded`` (default: not ``reference_padding``) excludes padded joint columns."""
        score = (self.scale.abs() + 1e-9) * torch.einsum(
            "bid,bjd->bij", F.normalize(point, dim=-1), F.normalize(joint, dim=-1))
        if mask_padded is None:
            mask_padded = not self.reference_padding
        if mask_padded and joint_valid is not None:
            score = score.masked_fill(~joint_valid.bool()[:, None, :], float("-inf"))
        return score.log_softmax(-1) if log else score.softmax(-1)

    def forward(self, points: torch.Tensor, joints: torch.Tensor, shape: torch.Tensor,
                joint_valid: Optional[torch.Tensor] = None, parents: Optional[torch.Tensor] = None,
                hop_dist: Optional[torch.Tensor] = None, point_feats: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Skinning weights (B, Np, Nj); each row sums to 1."""
        p, j = self.forward_features(points, joints, shape, joint_valid, parents, hop_dist, point_feats)
        return self.forward_head(p, j, joint_valid)


# ------------------------------------------------------------------------------------------------
# skeleton: joint tokenizer
# ------------------------------------------------------------------------------------------------
def tokenize_skeleton(joints: torch.Tensor, parents: torch.Tensor, n_bins: int = 128) -> torch.Tensor:
    """(N, 3) joints in [-0.5, 0.5] + (N,) parents (-1 = root; a parent must precede its child)
    -> [bos, x0, y0, z0, p0, x1, ..., eos]. Coordinates: ``clip(floor((c + 0.5) * n_bins)) + 3``;
    parent token ``parent + 1 + 3`` (so a root reads 3)."""
    if joints.dim() != 2 or joints.shape[1] != 3 or parents.shape != joints.shape[:1]:
        raise ValueError(f"joints must be (N, 3) and parents (N,), got {tuple(joints.shape)} and {tuple(parents.shape)}")
    parents = parents.long()
    n = joints.shape[0]
    if n and bool(((parents >= torch.arange(n, device=parents.device)) | (parents < -1)).any()):
        raise ValueError("each parent index must be -1 (root) or smaller than the joint's own index "
                         f"(hierarchical order), got {parents.tolist()}")
    coords = ((joints.float() + 0.5) * n_bins).floor().clamp(0, n_bins - 1).long() + NUM_SPECIAL
    par = (parents + 1 + NUM_SPECIAL)[:, None]
    body = torch.cat([coords, par], dim=1).reshape(-1)
    return torch.cat([body.new_tensor([BOS]), body, body.new_tensor([EOS])])


def detokenize_skeleton(tokens: torch.Tensor, n_bins: int = 128) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of :func:`tokenize_skeleton` (upstream ``detokenize_joint_token``): drops special
    tokens (the sequence ends at the first eos), returns ((N, 3) lower bin edges, (N,) parents with
    -1 = root), or None when the body is not a multiple of 4 tokens or names a missing parent."""
    t = tokens.reshape(-1).long()
    eos = torch.nonzero(t == EOS)
    if eos.numel():
        t = t[:int(eos[0])]
    t = t[t >= NUM_SPECIAL] - NUM_SPECIAL
    if t.numel() % 4:
        return None
    data = t.view(-1, 4)
    if bool((data[:, :3] >= n_bins).any()):
        return None
    joints = data[:, :3].float() / n_bins - 0.5
    parents = data[:, 3] - 1
    if bool((parents >= data.shape[0]).any()):
        return None
    return joints, parents


# ------------------------------------------------------------------------------------------------
# skeleton: OPT decoder
# ------------------------------------------------------------------------------------------------
class OPTSelfAttention(nn.Module):
    """OPT attention (biased q/k/v/out projections) with an optional KV cache."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, layout, cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        B, L, C = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (m(x).unflatten(-1, (H, D)).transpose(1, 2) for m in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        out = _kernels.attention(q, k, v, layout, scale=D ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C)), (k, v)


class OPTDecoderLayer(nn.Module):
    """Post-LN OPT layer (``do_layer_norm_before=False``, as opt-350m): x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = OPTSelfAttention(dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, layout, cache=None):
        h, new_cache = self.self_attn(x, layout, cache)
        x = self.self_attn_layer_norm(x + self.dropout(h))
        x = self.final_layer_norm(x + self.dropout(self.fc2(F.relu(self.fc1(x)))))
        return x, new_cache


class SkeletonDecoder(nn.Module):
    """Embedding tables and layers of upstream's ``SkeletonOPTDecoder`` (same key names)."""

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, ffn_dim: int, max_positions: int,
                 tokens_per_joint: int = 4, dropout: float = 0.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.embed_positions = nn.Embedding(max_positions + 2, dim)  # OPT's learned positions, offset 2
        self.token_embed_positions = nn.Embedding(tokens_per_joint + NUM_SPECIAL, dim)
        self.cond_embed = nn.Embedding(2, dim)
        self.layers = nn.ModuleList(OPTDecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(depth))


class PuppeteerSkeletonGPT(NoClassifierApi, NotScriptable, nn.Module):
    """Puppeteer's auto-regressive skeleton generator with joint tokens.

    Sequence: ``cond_len`` condition tokens (shape-encoder head token -> ``cond_head_proj``, the
    rest -> ``cond_proj``, plus target row 0 and condition type 0), then the generated stream
    ``[bos, x0, y0, z0, p0, x1, ...]``. Generated token t (bos at t = 0) gets its token embedding,
    the slot row (a special token's own id, else ``(t - 1) % 4 + 3``), condition type 1 and, for
    t >= 1 while it exists, target-aware row ``1 + (t - 1) // 4``. Learned OPT positions (offset 2)
    count over the whole sequence. The attention is causal over everything (no bidirectional prefix).

    Args:
        dim / depth / num_heads / ffn_dim: 1024 / 24 / 16 / 4096 (opt-350m). n_bins: 128.
        max_joints: 101. cond_len / cond_dim: 257 / 768 (Michelangelo). dropout: OPT's 0.1 in training.
        tie_word_embeddings: ``lm_head`` shares ``embed_tokens``' weight (HF OPT default).
    """
    _supported_calls = "forward(**model.example_inputs()) (token logits), prefill() / step() or generate()"

    def __init__(self, dim: int = 1024, depth: int = 24, num_heads: int = 16, ffn_dim: int = 4096, n_bins: int = 128,
                 max_joints: int = 101, cond_len: int = 257, cond_dim: int = 768, dropout: float = 0.1,
                 tie_word_embeddings: bool = True, target_aware: bool = True):
        super().__init__()
        self.dim, self.n_bins, self.max_joints = dim, n_bins, max_joints
        self.cond_len, self.cond_dim = cond_len, cond_dim
        self.tokens_per_joint = 4
        self.vocab_size = n_bins + NUM_SPECIAL
        self.max_gen = max_joints * self.tokens_per_joint + 2
        self.max_length = self.max_gen + cond_len
        self.num_features = self.head_hidden_size = dim
        self.num_classes = 0
        self.grad_checkpointing = False
        self.decoder = SkeletonDecoder(self.vocab_size, dim, depth, num_heads, ffn_dim, self.max_length,
                                       self.tokens_per_joint, dropout)
        self.lm_head = nn.Linear(dim, self.vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight
        self.cond_head_proj = nn.Linear(cond_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, dim)
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, max_joints, dim)) if target_aware else None
        self.init_weights()

    def init_weights(self):
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
        if self.target_aware_pos_embed is not None:
            nn.init.trunc_normal_(self.target_aware_pos_embed, std=0.02)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"target_aware_pos_embed"}

    @torch.jit.ignore
    def example_inputs(self, batch_size: int = 1, device=None, dtype=None,
                       num_tokens: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Random ``forward`` keyword inputs (benchmarks, export): ``batch_size`` condition sets plus
        ``num_tokens`` generated tokens (bos, then joint tokens) for teacher forcing; default the
        longest stream the model takes, ``max_gen - 1`` (405 for 101 joints)."""
        T = self.max_gen - 1 if num_tokens is None else num_tokens
        for k, v in (("batch_size", batch_size), ("num_tokens", T)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"example_inputs: {k} must be an int >= 1, got {v!r}")
        if T > self.max_gen:
            raise ValueError(f"example_inputs: num_tokens={T} exceeds max_gen={self.max_gen}")
        ids = torch.randint(NUM_SPECIAL, self.vocab_size, (batch_size, T), device=device)
        ids[:, 0] = BOS
        cond = torch.randn(batch_size, self.cond_len, self.cond_dim, device=device, dtype=dtype or torch.float32)
        return dict(cond=cond, input_ids=ids)

    # -- embeddings -------------------------------------------------------------------------------
    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.dim() != 3 or cond.shape[1] != self.cond_len or cond.shape[2] != self.cond_dim:
            raise ValueError(f"cond must be (B, {self.cond_len}, {self.cond_dim}) shape-encoder tokens "
                             f"(head token first), got {tuple(cond.shape)}")
        x = torch.cat([self.cond_head_proj(cond[:, :1]), self.cond_proj(cond[:, 1:])], dim=1)
        if self.target_aware_pos_embed is not None:
            x = x + self.target_aware_pos_embed[:, :1]
        return x + self.decoder.cond_embed.weight[0]

    def embed_generated(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Generated tokens ``ids`` (B, T) at stream indices start .. start + T - 1 (bos at 0)."""
        # a value check needs a host sync; compiled / exported graphs rely on the embedding lookup's bounds check
        if ids.numel() and not torch.compiler.is_compiling() and \
                (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        T = ids.shape[1]
        t = torch.arange(start, start + T, device=ids.device)
        slot = torch.where(ids < NUM_SPECIAL, ids, ((t - 1) % self.tokens_per_joint + NUM_SPECIAL)[None])
        x = self.decoder.embed_tokens(ids) + self.decoder.token_embed_positions(slot)
        x = x + self.decoder.cond_embed.weight[1]
        if self.target_aware_pos_embed is not None:
            row = 1 + torch.div(t - 1, self.tokens_per_joint, rounding_mode="floor")
            ok = (t >= 1) & (row < self.target_aware_pos_embed.shape[1])
            rows = self.target_aware_pos_embed[0, row.clamp(0, self.target_aware_pos_embed.shape[1] - 1)]
            x = x + rows * ok[:, None].to(x.dtype)
        return x

    def _positions(self, start: int, L: int, device) -> torch.Tensor:
        if start + L > self.max_length:
            raise ValueError(f"sequence of {start + L} tokens exceeds max_length {self.max_length} "
                             f"({self.cond_len} condition + {self.max_gen} generated)")
        return self.decoder.embed_positions(torch.arange(start + 2, start + L + 2, device=device))

    def _run(self, x: torch.Tensor, start: int, caches: Optional[List] = None, kv_valid=None):
        L = x.shape[1]
        x = x + self._positions(start, L, x.device)
        layout = _kernels.causal(L, start + L, kv_valid=kv_valid)
        new = []
        for i, layer in enumerate(self.decoder.layers):
            cache = caches[i] if caches is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x, kv = _checkpoint(layer, x, layout, None)
            else:
                x, kv = layer(x, layout, cache)
            new.append(kv)
        return x, new

    # -- full sequence ----------------------------------------------------------------------------
    def forward(self, cond: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, cond_len + T, vocab) for condition + generated tokens (teacher forcing).
        Position ``cond_len - 1 + t`` predicts generated token t. ``attention_mask`` (B, T) bool marks
        real generated tokens (right padding needs none: the layout is causal)."""
        x = self.embed_condition(cond)
        kv_valid = None
        if input_ids is not None:
            x = torch.cat([x, self.embed_generated(input_ids)], dim=1)
            if attention_mask is not None:
                kv_valid = torch.cat([attention_mask.new_ones(cond.shape[0], self.cond_len), attention_mask], 1).bool()
        h, _ = self._run(x, 0, kv_valid=kv_valid)
        return self.lm_head(h)

    def loss(self, cond: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy over the generated stream (pad targets ignored)."""
        logits = self.forward(cond, input_ids[:, :-1])
        pred = logits[:, self.cond_len - 1:]
        tgt = input_ids.masked_fill(input_ids == PAD, -100)
        return F.cross_entropy(pred.reshape(-1, self.vocab_size).float(), tgt.reshape(-1), ignore_index=-100)

    # -- incremental decoding ---------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor):
        """Run the condition; returns (last logits (B, vocab), cache)."""
        h, caches = self._run(self.embed_condition(cond), 0)
        return self.lm_head(h[:, -1]), caches

    def step(self, ids: torch.Tensor, stream_index: int, caches: List):
        """Feed generated tokens ``ids`` (B, T) at stream indices stream_index..; returns
        (logits (B, T, vocab), cache)."""
        start = caches[0][0].shape[2]
        h, caches = self._run(self.embed_generated(ids, stream_index), start, caches)
        return self.lm_head(h), caches

    def _allowed(self, t: int, B: int, device, min_joints: int) -> torch.Tensor:
        """Vocab mask for generated token t that keeps the output a valid joint tree."""
        allow = torch.zeros(B, self.vocab_size, dtype=torch.bool, device=device)
        if t == 0:
            allow[:, BOS] = True
            return allow
        slot, j = (t - 1) % self.tokens_per_joint, (t - 1) // self.tokens_per_joint
        if slot == 0:  # x of joint j (j joints are complete), or the end
            if j < self.max_joints:
                allow[:, NUM_SPECIAL:] = True
            if j >= min(min_joints, self.max_joints):
                allow[:, EOS] = True
        elif slot < 3:
            allow[:, NUM_SPECIAL:] = True
        elif j == 0:  # the first joint is the root
            allow[:, NUM_SPECIAL] = True
        else:  # parent of joint j: an earlier joint
            allow[:, NUM_SPECIAL + 1:NUM_SPECIAL + 1 + j] = True
        return allow

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, do_sample: bool = False, top_k: int = 50, top_p: float = 0.95,
                 temperature: float = 1.0, constrained: bool = True, min_joints: int = 1,
                 max_new_tokens: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Generated streams (B, T) starting with bos; finished rows are padded with eos.

        Greedy by default; ``do_sample`` uses top-k / top-p (upstream: 50 / 0.95). ``constrained``
        masks the logits so every output is a valid tree (bos first, parents precede children, one
        root, at most ``max_joints``); upstream decodes unconstrained and repairs afterwards.
        """
        B = cond.shape[0]
        limit = min(self.max_gen, max_new_tokens or self.max_gen)
        logits, caches = self.prefill(cond)
        out = torch.full((B, limit), EOS, dtype=torch.long, device=cond.device)
        done = torch.zeros(B, dtype=torch.bool, device=cond.device)
        for t in range(limit):
            lg = logits.float()
            if constrained:
                lg = lg.masked_fill(~self._allowed(t, B, cond.device, min_joints), float("-inf"))
            nxt = _sample(lg, do_sample, top_k, top_p, temperature, generator)
            nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
            out[:, t] = nxt
            done = done | (nxt == EOS)
            if bool(done.all()) or t + 1 == limit:
                return out[:, :t + 1]
            step_logits, caches = self.step(nxt[:, None], t, caches)
            logits = step_logits[:, -1]
        return out

    def generate_skeletons(self, cond: torch.Tensor, **kwargs) -> List[Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`generate` then :func:`detokenize_skeleton` per row."""
        return [detokenize_skeleton(row, self.n_bins) for row in self.generate(cond, **kwargs)]


def _sample(logits: torch.Tensor, do_sample: bool, top_k: int, top_p: float, temperature: float,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, order = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, srt)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
_DROP = ("point_encoder.", "point_embed.")  # Michelangelo and PartField: out of scope


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None):
    """Upstream Puppeteer ``.pth`` (weights under ``"model"``) -> this module's keys.

    Skinning: ``blocks.k.rel_pos_*`` -> ``blocks.k.taja.rel_pos_*``, GEGLU ``fn.net.{0,2}`` ->
    ``fn.{fc1,fc2}``. Skeleton: ``transformer.model.decoder.`` -> ``decoder.``, ``transformer.lm_head``
    -> ``lm_head``. The frozen Michelangelo encoder (``point_encoder.*``) and PartField
    (``point_embed.*``) are dropped: their outputs are inputs here. mmengine checkpoints
    (``state_dict`` with a ``model.`` prefix) and zoo state dicts pass through.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "model.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(_DROP):
            continue
        k = re.sub(r"^transformer\.model\.decoder\.", "decoder.", k)
        k = re.sub(r"^transformer\.lm_head\.", "lm_head.", k)
        k = re.sub(r"^(blocks\.\d+\.)rel_pos_", r"\1taja.rel_pos_", k)
        k = re.sub(r"\.fn\.net\.0\.", ".fn.fc1.", k)
        k = re.sub(r"\.fn\.net\.2\.", ".fn.fc2.", k)
        out[k] = v
    if model is not None and "lm_head.weight" not in out and "decoder.embed_tokens.weight" in out \
            and "lm_head.weight" in model.state_dict():
        out["lm_head.weight"] = out["decoder.embed_tokens.weight"]
    return out


# ------------------------------------------------------------------------------------------------
# cfgs and entry points
# ------------------------------------------------------------------------------------------------
_HF = "Seed3D/Puppeteer"  # Hugging Face Hub repo
_NOTES = ("not an image model: the skinning net takes points (B, Np, 6), joints (B, Nj, 6), shape tokens and the "
          "joint tree; the skeleton GPT takes shape-encoder tokens (B, cond_len, cond_dim) and joint token ids; "
          "model.example_inputs() builds them",
          "the Michelangelo shape encoder and PartField features are not included; checkpoint keys "
          "point_encoder.* and point_embed.* are dropped by checkpoint_filter_fn")


def _cfg(url: str = "", **kwargs):
    base = dict(license="apache-2.0", paper_ids="arXiv:2508.10898",
                paper_name="Puppeteer: Rig and Animate Your 3D Models",
                origin_url="https://github.com/Seed3D/Puppeteer",
                num_classes=None, input_size=None, pool_size=None, crop_pct=None, crop_mode=None, interpolation=None,
                mean=None, std=None, first_conv=None, classifier=None, notes=_NOTES)
    base.update(kwargs)
    if url:
        return hub_cfg(url=url, sha256=None, **base)
    return hub_cfg(**base)


default_cfgs = generate_default_cfgs({
    "puppeteer_skin_d1.w_diverse_pose": _cfg(
        hf_hub_id=_HF, hf_hub_filename="skinning_ckpts/puppeteer_skin_w_diverse_pose_depth1.pth"),
    "puppeteer_skin_d1.wo_diverse_pose": _cfg(
        hf_hub_id=_HF, hf_hub_filename="skinning_ckpts/puppeteer_skin_wo_diverse_pose_depth1.pth"),
    "puppeteer_skin_d2.w_diverse_pose": _cfg(
        hf_hub_id=_HF, hf_hub_filename="skinning_ckpts/puppeteer_skin_w_diverse_pose_depth2.pth"),
    "puppeteer_skin_small.untrained": _cfg(),
    "puppeteer_skeleton_opt350m.w_diverse_pose": _cfg(
        hf_hub_id=_HF, hf_hub_filename="skeleton_ckpts/puppeteer_skeleton_w_diverse_pose.pth"),
    "puppeteer_skeleton_opt350m.wo_diverse_pose": _cfg(
        hf_hub_id=_HF, hf_hub_filename="skeleton_ckpts/puppeteer_skeleton_wo_diverse_pose.pth"),
    "puppeteer_skeleton_small.untrained": _cfg(),
})


_DATA_PIPELINE = ("the rigging pipeline (zoo.tasks.rigging: point, joint and shape tensors from meshes) or "
                  "model.example_inputs()")


def _create(cls, variant: str, pretrained: bool = False, **kwargs):
    for k in ("features_only", "num_classes", "in_chans", "global_pool", "out_indices"):
        if kwargs.get(k) not in (None, False):
            raise UnsupportedError(f"create_model({variant!r}, {k}={kwargs[k]!r}): {variant} is not an image "
                                   f"classifier or backbone; build it without {k} and call "
                                   f"forward(**model.example_inputs())")
        kwargs.pop(k, None)
    model = build_model(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=None,
                        **kwargs)
    model.pretrained_cfg = model.default_cfg = NoImageDataConfig(model.pretrained_cfg, _DATA_PIPELINE)
    return model


@register_model
def puppeteer_skin_d1(pretrained: bool = False, **kwargs) -> PuppeteerSkinNet:
    """Skinning network, 1 block, dim 768, 8 x 64 heads, PartField (448) point features."""
    return _create(PuppeteerSkinNet, "puppeteer_skin_d1", pretrained, **dict(dict(depth=1), **kwargs))


@register_model
def puppeteer_skin_d2(pretrained: bool = False, **kwargs) -> PuppeteerSkinNet:
    """Skinning network, 2 blocks."""
    return _create(PuppeteerSkinNet, "puppeteer_skin_d2", pretrained, **dict(dict(depth=2), **kwargs))


@register_model
def puppeteer_skin_small(pretrained: bool = False, **kwargs) -> PuppeteerSkinNet:
    """CPU-sized skinning network (dim 64, 4 x 16 heads, FFN x2, no PartField) that embeds raw shape
    points itself; trains on the embedded articulated-shapes set."""
    args = dict(dim=64, depth=1, heads=4, dim_head=16, ff_mult=2, part_dim=0, shape_in_chans=6, embed_hidden=48)
    return _create(PuppeteerSkinNet, "puppeteer_skin_small", pretrained, **dict(args, **kwargs))


@register_model
def puppeteer_skeleton_opt350m(pretrained: bool = False, **kwargs) -> PuppeteerSkeletonGPT:
    """Skeleton generator: post-LN OPT-350m decoder (24 x 1024, 16 heads, FFN 4096), 101 joints."""
    return _create(PuppeteerSkeletonGPT, "puppeteer_skeleton_opt350m", pretrained, **kwargs)


@register_model
def puppeteer_skeleton_small(pretrained: bool = False, **kwargs) -> PuppeteerSkeletonGPT:
    """CPU-sized skeleton generator: 2 x 64, 4 heads, FFN 128, 16 joints, 9 condition tokens of width 32."""
    args = dict(dim=64, depth=2, num_heads=4, ffn_dim=128, max_joints=16, cond_len=9, cond_dim=32, dropout=0.0)
    return _create(PuppeteerSkeletonGPT, "puppeteer_skeleton_small", pretrained, **dict(args, **kwargs))
