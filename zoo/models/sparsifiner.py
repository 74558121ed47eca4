# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from lim142857/Sparsifiner (MIT; Copyright (c) 2023 Cong Wei); see THIRD_PARTY_NOTICES.md
"""Sparsifiner: instance-dependent sparse attention for ViTs.

Wei, Duke, Jiang, Aarabi, Taylor, Shkurti, "Sparsifiner: Learning Sparse Instance-Dependent
Attention for Efficient Vision Transformers", CVPR 2023 (arXiv 2303.13755); upstream
lim142857/Sparsifiner.

A DeiT ViT whose every attention layer carries a *connectivity predictor*
(`zoo.layers.connectivity`): from the layer's own q, k it builds a low-rank approximation of the
attention rows, keeps the top ceil(keep_rate * N) keys per query (cls row dense) and runs the real
attention on those keys only, through `zoo.kernels.attention` (`key_lists` layout). On CPU only
the kept pairs are computed (sampled logits, then an embedding bag of the kept value rows); on
CUDA, keep rates up to 1/16 use a Triton kernel that gathers each query's listed keys, denser ones
the block-sparse kernel on the element mask, whose tiles run on tensor cores.

The network is timm's `VisionTransformer` with the attention module swapped, so the parameter
names are timm's and `deit_*_patch16_224` weights load as they are; the predictors add
`blocks.i.attn.mask_predictor.*` (upstream names).

Modes (`set_attn_mode`), one per phase of the recipe:
  'sparse' (default): predicted mask, sparse attention, predictors frozen (phase 2 / inference).
  'recon': dense attention, predictors trainable, `forward_aux` returns their approximations and
           the dense attention rows to reconstruct (phase 1).
  'dense': the plain DeiT (teacher).

LV-ViT variant (`SparsifinerLVViT`, upstream `sparsifiner_lvvit.py` on Jiang et al., "All Tokens
Matter: Token Labeling for Training Better Vision Transformers", NeurIPS 2021, zihangJiang/
TokenLabeling): the same attention and predictors on LV-ViT's backbone: a 4-conv patch embedding,
residual branches divided by `skip_lam`, MLP ratio 3, no qkv bias, LayerNorm eps 1e-5 and the
token-labeling aux head. Its logits are, as upstream evaluates them,
head(cls) + 0.5 * max over patch tokens of aux_head(token); `forward_dense` gives the two parts
(upstream's `return_dense` training output). The released LV-ViT-S weights load through
`checkpoint_filter_fn`.

Token pruning (DynamicViT-style, upstream `TOKEN_PRUNING_LOC` / `TOKEN_KEEP_RATE_BASE`, off by
default): after the attention of the i-th listed layer (i = 1, 2, ...), only the
ceil(base^i * N_patches) patch tokens the cls query attends most (mean over heads) go on; the cls
token always stays. Pruned tokens are dropped (gathered out), not zeroed as upstream does, so
later layers really run on fewer tokens; the predictors use their projection rows at the kept
tokens' original positions, which is what upstream's zeroing computes. Sparse mode only (upstream
never prunes while reconstructing); the attention budget is keep_rate of the remaining tokens.

Fixes against upstream: the attention budget is computed per call, never written back to the
module (upstream overwrites `attn_budget` in forward and it shrinks for good); the token
projections are resampled to the actual token count (upstream is fixed to N = 197 / 224 px).
"""
import math
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, Format, LayerNorm, PatchEmbed, nchw_to, trunc_normal_
from timm.layers.trace_utils import _assert
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter_fn

from zoo import hub
from zoo.models._builder import build_model
from zoo.errors import NotScriptable, check_batch
from zoo.kernels import Layout, attention
from zoo.layers.connectivity import ConnectivityPredictor, keep_count, resample_token_proj, topk_connectivity

__all__ = ["Sparsifiner", "SparsifinerLVViT", "SparsifinerAttention", "ConvStemPatchEmbed", "checkpoint_filter_fn",
           "ATTN_MODES"]

ATTN_MODES = ("sparse", "recon", "dense")


def attention_rows(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention probabilities (B, H, Lq, N), computed by the kernel with v = identity."""
    N = k.shape[2]
    eye = torch.eye(N, dtype=q.dtype, device=q.device).expand(q.shape[0], q.shape[1], N, N)
    return attention(q, k, eye, scale=scale)


class SparsifinerAttention(Attention):
    """timm `Attention` (same parameters) + a connectivity predictor that sparsifies it."""

    def __init__(self, dim: int, num_heads: int = 8, *, grid_size: Tuple[int, int] = (14, 14),
                 num_prefix_tokens: int = 1, keep_rate: float = 0.25, reduce_c_factor: int = 2,
                 reduce_n_factor: int = 6, basis_threshold: float = 0.02, coef_topk: int = 8,
                 attn_drop: float = 0.0, **kwargs):
        if kwargs.get("gated"):
            raise ValueError("gated attention is not supported by SparsifinerAttention")
        super().__init__(dim, num_heads=num_heads, attn_drop=attn_drop, **kwargs)
        keep_count(keep_rate, 2)   # validates the range
        self.keep_rate = float(keep_rate)
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_mode = "sparse"
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        self.mask_predictor = ConnectivityPredictor(
            self.head_dim, num_heads, grid_size, num_prefix_tokens=num_prefix_tokens,
            reduce_c_factor=reduce_c_factor, reduce_n_factor=reduce_n_factor,
            basis_threshold=basis_threshold, coef_topk=coef_topk, **dd)

    def _dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def _qkv(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _out(self, o):
        B, _, N, _ = o.shape
        o = o.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(o)))

    def predict_connectivity(self, q: torch.Tensor, k: torch.Tensor, token_pos: Optional[torch.Tensor] = None,
                             num_patches: int = 0) -> Tuple[torch.Tensor, Optional[Layout]]:
        """-> (approx attention (B, H, N-P, N), key-lists layout, or None when it keeps every key).

        `token_pos` / `num_patches`: after token pruning, the kept patch tokens' original positions
        and the unpruned patch count (see `ConnectivityPredictor.forward`).
        """
        if token_pos is None:
            approx = self.mask_predictor(q, k)
        else:
            approx = self.mask_predictor(q, k, token_pos=token_pos, num_patches=num_patches)
        return approx, topk_connectivity(approx, self.keep_rate, self.num_prefix_tokens, none_if_dense=True,
                                         nonnegative=True)     # coef >= 0 times |basis|

    def forward_aux(self, x: torch.Tensor, token_pos: Optional[torch.Tensor] = None, num_patches: int = 0,
                    cls_attn: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Forward that also returns what the training losses need (see the module docstring).

        `token_pos`, `num_patches`: pruned token set (see `predict_connectivity`). `cls_attn`: also
        return the prefix queries' attention probabilities `cls_attn` (B, H, P, N), detached (the
        token-pruning score).
        """
        q, k, v = self._qkv(x)
        aux: Dict[str, torch.Tensor] = {}
        if cls_attn:
            with torch.no_grad():
                aux["cls_attn"] = attention_rows(q[:, :, :self.num_prefix_tokens].detach(), k.detach(), self.scale)
        if self.attn_mode == "sparse":
            approx, conn = self.predict_connectivity(q, k, token_pos, num_patches)
            o = attention(q, k, v, conn, scale=self.scale, dropout_p=self._dropout_p())
            aux.update(approx_attn=approx, connectivity=conn)
        else:
            o = attention(q, k, v, scale=self.scale, dropout_p=self._dropout_p())
            if self.attn_mode == "recon":
                aux["approx_attn"] = self.mask_predictor(q, k, recon=True)
                with torch.no_grad():
                    aux["attn"] = attention_rows(q.detach(), k.detach(), self.scale)[:, :, self.num_prefix_tokens:]
        return self._out(o), aux

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if isinstance(attn_mask, torch.Tensor) or (isinstance(is_causal, bool) and is_causal):   # fx: proxies
            raise ValueError("SparsifinerAttention builds its own mask; attn_mask / is_causal are not accepted")
        q, k, v = self._qkv(x)
        conn = None
        if self.attn_mode == "sparse":
            conn = self.predict_connectivity(q, k)[1]
        return self._out(attention(q, k, v, conn, scale=self.scale, dropout_p=self._dropout_p()))


class Sparsifiner(NotScriptable, VisionTransformer):
    """timm `VisionTransformer` with `SparsifinerAttention` in every block.

    Args (beyond timm's VisionTransformer):
        keep_rate: fraction of keys each non-cls query attends (upstream ATTN_KEEP_RATE 0.25).
        reduce_c_factor, reduce_n_factor: predictor channel / token reduction (2, 6 -> 64->32, 197->32).
        basis_threshold: |basis| values at or below it are zeroed (0.02).
        coef_topk: basis coefficients kept per row (8).
        predictor_rank: low-rank size n (default: tokens at img_size // reduce_n_factor; pass 32 to
            load 224-px DeiT-S predictors into a model built at another size).
        token_pruning_loc: block indices after whose attention tokens are pruned (upstream
            TOKEN_PRUNING_LOC, e.g. (3, 6, 9)); empty = no pruning (default).
        token_keep_rate_base: at the i-th pruning layer ceil(base^i * N_patches) patch tokens stay
            (upstream TOKEN_KEEP_RATE_BASE; 1.0 = no pruning).
    """

    def __init__(self, img_size=224, patch_size=16, keep_rate: float = 0.25, reduce_c_factor: int = 2,
                 reduce_n_factor: int = 6, basis_threshold: float = 0.02, coef_topk: int = 8,
                 predictor_rank: Optional[int] = None, dynamic_img_size: bool = True,
                 token_pruning_loc: Sequence[int] = (), token_keep_rate_base: float = 1.0, **kwargs):
        for bad in ("attn_layer", "block_fn", "reg_tokens", "no_embed_class"):
            if kwargs.get(bad):
                raise ValueError(f"Sparsifiner does not accept {bad}={kwargs[bad]!r}")
        if not kwargs.get("class_token", True):
            raise ValueError("Sparsifiner needs the class token (its query row stays dense)")
        # timm instantiates attn_layer itself (it must be a class): build with the class, then give
        # each layer the predictor configured for this model
        super().__init__(img_size=img_size, patch_size=patch_size, attn_layer=SparsifinerAttention,
                         dynamic_img_size=dynamic_img_size, **kwargs)
        keep_count(keep_rate, 2)
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        for a in self.attn_modules():
            a.keep_rate = float(keep_rate)
            a.mask_predictor = ConnectivityPredictor(
                a.head_dim, a.num_heads, tuple(self.patch_embed.grid_size), num_prefix_tokens=self.num_prefix_tokens,
                reduce_c_factor=reduce_c_factor, reduce_n_factor=reduce_n_factor,
                basis_threshold=basis_threshold, coef_topk=coef_topk, rank=predictor_rank, **dd)
        self.set_attn_mode("sparse")
        self.set_token_pruning(token_pruning_loc, token_keep_rate_base)

    # -- sparsity controls ---------------------------------------------------------------------
    def attn_modules(self) -> List[SparsifinerAttention]:
        return [b.attn for b in self.blocks]

    def predictors(self) -> List[ConnectivityPredictor]:
        return [a.mask_predictor for a in self.attn_modules()]

    def set_keep_rate(self, keep_rate: float) -> None:
        keep_count(keep_rate, 2)
        for a in self.attn_modules():
            a.keep_rate = float(keep_rate)

    def set_attn_mode(self, mode: str) -> None:
        """'sparse' | 'recon' | 'dense'; predictors are trainable in 'recon' only (phase 1)."""
        if mode not in ATTN_MODES:
            raise ValueError(f"attention mode must be one of {ATTN_MODES}, got {mode!r}")
        for a in self.attn_modules():
            a.attn_mode = mode
            a.mask_predictor.requires_grad_(mode == "recon")
        self.attn_mode = mode

    def set_token_pruning(self, loc: Sequence[int] = (), keep_rate_base: float = 1.0) -> None:
        """DynamicViT-style token pruning after the attention of blocks `loc` (empty: off)."""
        loc = tuple(sorted({int(i) for i in loc}))
        if loc and not 0 <= loc[0] <= loc[-1] < len(self.blocks):
            raise ValueError(f"token_pruning_loc must be block indices in [0, {len(self.blocks)}), got {loc}")
        if not 0.0 < keep_rate_base <= 1.0:
            raise ValueError(f"token_keep_rate_base must be in (0, 1], got {keep_rate_base}")
        self.token_pruning_loc = loc
        self.token_keep_rate_base = float(keep_rate_base)

    def token_keep_counts(self, num_patches: int) -> Dict[int, int]:
        """{block index: patch tokens kept after it} for an input of `num_patches` patch tokens."""
        if not self.token_pruning_loc or self.token_keep_rate_base >= 1.0:
            return {}
        return {blk: max(1, min(num_patches, math.ceil(self.token_keep_rate_base ** i * num_patches)))
                for i, blk in enumerate(self.token_pruning_loc, 1)}

    def _pruning_active(self) -> bool:
        return self.attn_mode == "sparse" and bool(self.token_pruning_loc) and self.token_keep_rate_base < 1.0

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _forward_blocks(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[Dict[str, Any]], Optional[torch.Tensor]]:
        """Blocks one by one with the per-layer aux outputs and token pruning (when on).

        -> (tokens, per-layer aux, kept patch positions (B, N') in the unpruned order or None).
        """
        P = self.num_prefix_tokens
        num_patches = x.shape[1] - P
        keep = self.token_keep_counts(num_patches) if self._pruning_active() else {}
        pos: Optional[torch.Tensor] = None
        layers = []
        for i, blk in enumerate(self.blocks):
            o, aux = blk.attn.forward_aux(blk.norm1(x), token_pos=pos, num_patches=num_patches, cls_attn=i in keep)
            x = x + blk.drop_path1(blk.ls1(o))
            if i in keep:
                # pruning before the MLP: it is per token, so the kept tokens come out the same
                score = aux.pop("cls_attn")[:, :, 0, P:].mean(dim=1)             # (B, N')
                idx = score.topk(keep[i], dim=-1, sorted=False).indices.sort(dim=-1).values
                patches = x[:, P:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                x = torch.cat([x[:, :P], patches], dim=1)
                pos = idx if pos is None else pos.gather(1, idx)
                aux["token_index"] = pos
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            layers.append(aux)
        return x, layers, pos

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        check_batch(x, type(self).__name__)
        if not self._pruning_active():
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(self._forward_blocks(self._embed(x))[0])

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        if self._pruning_active():
            raise ValueError("forward_intermediates needs the full token grid; token pruning is on "
                             f"(token_pruning_loc={self.token_pruning_loc}): call set_token_pruning(()) first")
        return super().forward_intermediates(x, *args, **kwargs)

    def forward_aux(self, x: torch.Tensor) -> Dict[str, Any]:
        """logits, final tokens and per-layer predictor outputs (approx_attn, connectivity or attn).

        With token pruning on, also `token_index` (B, N'): the kept patch tokens' positions in
        the unpruned sequence (final tokens = prefix + those), and per pruning layer the same.
        """
        x, layers, pos = self._forward_blocks(self._embed(x))
        x = self.norm(x)
        out = dict(logits=self.forward_head(x), tokens=x, layers=layers)
        if pos is not None:
            out["token_index"] = pos
        return out


class ConvStemPatchEmbed(PatchEmbed):
    """LV-ViT's patch embedding ('4_2'): a 7x7/2 conv and two 3x3 convs (each BN + ReLU, `stem_chs`
    channels) at half resolution, then a (patch/2)-patchify conv to `embed_dim`.

    A timm `PatchEmbed` (grid size, output format, dynamic size and padding behave the same); the
    parameter names are TokenLabeling's (`conv1`, `bn1`, ..., `proj`).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, stem_chs: int = 64,
                 bias: bool = True, device=None, dtype=None, **kwargs):
        p = patch_size if isinstance(patch_size, int) else patch_size[0]
        if isinstance(patch_size, (tuple, list)) and len(set(patch_size)) != 1 or p % 2:
            raise ValueError(f"ConvStemPatchEmbed needs a square, even patch size (stride-2 stem), got {patch_size}")
        dd = dict(device=device, dtype=dtype)
        super().__init__(img_size, patch_size, in_chans=stem_chs, embed_dim=embed_dim, bias=bias, **kwargs, **dd)
        del self.proj   # rebuilt below for the stem's half-resolution output, after the stem convs
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv2 = nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv3 = nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_chs, **dd)
        self.proj = nn.Conv2d(stem_chs, embed_dim, p // 2, stride=p // 2, bias=bias, **dd)

    def set_input_size(self, img_size=None, patch_size=None):
        if patch_size is not None and tuple(patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,) * 2) \
                != self.patch_size:
            raise ValueError("ConvStemPatchEmbed cannot change its patch size (the stem is fixed)")
        super().set_input_size(img_size=img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size:
            _assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
            _assert(W == self.img_size[1], f"Input width ({W}) doesn't match model ({self.img_size[1]}).")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        else:
            _assert(H % ph == 0, f"Input height ({H}) must be divisible by the patch size ({ph}).")
            _assert(W % pw == 0, f"Input width ({W}) must be divisible by the patch size ({pw}).")
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


class ResidualScale(nn.Module):
    """Divides a residual branch by `skip_lam` (LV-ViT; sits in the block's layer-scale slot)."""

    def __init__(self, skip_lam: float):
        super().__init__()
        self.skip_lam = float(skip_lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam

    def extra_repr(self) -> str:
        return f"skip_lam={self.skip_lam}"


class SparsifinerLVViT(Sparsifiner):
    """Sparsifiner on LV-ViT (upstream `SparsifinerLVViT`): `Sparsifiner` with LV-ViT's conv patch
    embedding, residual branches divided by `skip_lam`, and the token-labeling `aux_head`.

    Logits = head(pooled) + aux_weight * max over patch tokens of aux_head(token) (upstream's
    evaluation output, aux_weight 0.5); `forward_dense` returns the two heads separately.

    Args (beyond Sparsifiner's; LV-ViT defaults: mlp_ratio 3, qkv_bias False, LayerNorm eps 1e-5):
        skip_lam: residual divisor (LV-ViT-S: 2).
        aux_head: build the per-token head (released LV-ViT weights have one).
        aux_weight: weight of the aux max in the logits (0.5).
        stem_chs: channels of the conv stem (64; LV-ViT-L uses 128).
    """

    def __init__(self, img_size=224, patch_size=16, skip_lam: float = 2.0, aux_head: bool = True,
                 aux_weight: float = 0.5, stem_chs: int = 64, **kwargs):
        if kwargs.get("init_values"):
            raise ValueError("SparsifinerLVViT scales its residuals by 1/skip_lam; init_values (layer scale) "
                             "is not accepted")
        if skip_lam <= 0:
            raise ValueError(f"skip_lam must be > 0, got {skip_lam}")
        kwargs.setdefault("mlp_ratio", 3.0)
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("norm_layer", partial(LayerNorm, eps=1e-5))   # torch's default, as LV-ViT
        super().__init__(img_size=img_size, patch_size=patch_size,
                         embed_layer=partial(ConvStemPatchEmbed, stem_chs=stem_chs), **kwargs)
        self.skip_lam = float(skip_lam)
        for blk in self.blocks:
            blk.ls1 = ResidualScale(skip_lam)
            blk.ls2 = ResidualScale(skip_lam)
        self.use_aux_head = aux_head
        self.aux_weight = float(aux_weight)
        self.aux_head = self._make_aux_head(self.num_classes)

    def _make_aux_head(self, num_classes: int) -> Optional[nn.Linear]:
        if not (self.use_aux_head and num_classes > 0):
            return None
        head = nn.Linear(self.embed_dim, num_classes, device=self.cls_token.device, dtype=self.cls_token.dtype)
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = self._make_aux_head(num_classes)

    def forward_cls_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class-token head alone (upstream's training-time `x_cls`)."""
        return super().forward_head(x, pre_logits=pre_logits)

    def forward_aux_head(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch-token logits (B, N, num_classes) of the token-labeling head."""
        if self.aux_head is None:
            raise ValueError("this model has no aux head (aux_head=False or num_classes=0)")
        return self.aux_head(x[:, self.num_prefix_tokens:])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = super().forward_head(x, pre_logits=pre_logits)
        if pre_logits or self.aux_head is None or not self.global_pool:
            return out
        return out + self.aux_weight * self.forward_aux_head(x).max(dim=1).values

    def forward_dense(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cls logits (B, K), per-token aux logits (B, N, K)): upstream's `return_dense` output."""
        x = self.forward_features(x)
        return self.forward_cls_head(x), self.forward_aux_head(x)

    def forward_aux(self, x: torch.Tensor) -> Dict[str, Any]:
        """Sparsifiner's aux outputs + `cls_logits` and `aux_logits` (what upstream distills)."""
        out = super().forward_aux(x)
        if self.aux_head is not None and self.global_pool:
            out["cls_logits"] = self.forward_cls_head(out["tokens"])
            out["aux_logits"] = self.forward_aux_head(out["tokens"])
        return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Sparsifiner) -> Dict[str, torch.Tensor]:
    """DeiT / timm ViT, TokenLabeling LV-ViT or upstream Sparsifiner checkpoints -> this model.

    Plain ViT / LV-ViT checkpoints keep the model's freshly initialised predictors (to be trained
    in phase 1); upstream predictor token projections are resampled to the model's token count.
    LV-ViT (`SparsifinerLVViT`) uses TokenLabeling's own key names (`patch_embed.conv1/bn1/...`,
    `aux_head`), so past the unwrapping and resampling they map one to one; `aux_head` is dropped
    for a model built without one.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if getattr(model, "aux_head", None) is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_head.")}
    pred = {k: v for k, v in state_dict.items() if ".mask_predictor." in k}
    out = _vit_filter_fn({k: v for k, v in state_dict.items() if k not in pred}, model)
    own = model.state_dict()
    for k, v in pred.items():
        if k not in own:
            continue
        if k.endswith(("proj_n", "proj_back_n")) and v.shape != own[k].shape:
            p = model.num_prefix_tokens
            g = int(round(math.sqrt(v.shape[0] - p)))
            v = resample_token_proj(v, own[k].shape[0], p, (g, g), model.patch_embed.grid_size,
                                    rescale=k.endswith("proj_n"))
            if v.shape[1] != own[k].shape[1]:
                raise ValueError(f"{k}: checkpoint rank {v.shape[1]} != model rank {own[k].shape[1]} "
                                 "(build the model with predictor_rank=" f"{v.shape[1]})")
        out[k] = v
    for k, v in own.items():
        if ".mask_predictor." in k and k not in out:
            out[k] = v
    return out


def _create_sparsifiner(variant: str, pretrained: bool = False, model_cls=Sparsifiner, **kwargs) -> Sparsifiner:
    out_indices = kwargs.pop("out_indices", 3)
    feature_cfg = dict(feature_cls="getter", out_indices=out_indices)
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return build_model(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                       feature_cfg=feature_cfg, **kwargs)


def _cfg(url: str = "", sha256: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    base = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875, interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
        fixed_input_size=False, min_input_size=(3, 32, 32), license="apache-2.0",
        paper_ids="arXiv:2303.13755",
        paper_name="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
        origin_url="https://github.com/lim142857/Sparsifiner",
    )
    base.update(kwargs)
    return hub.cfg(url=url, sha256=sha256, **base)


_DEIT_NOTE = ("backbone only: DeiT ImageNet-1k weights; the connectivity predictors start untrained "
              "(upstream released no Sparsifiner weights), train them with configs/sparsifiner phase 1")

_LVVIT_NOTE = ("backbone only: TokenLabeling LV-ViT-S ImageNet-1k weights (83.3 % upstream); the connectivity "
               "predictors start untrained (upstream released no Sparsifiner weights), train them with "
               "configs/sparsifiner phase 1")

default_cfgs = generate_default_cfgs({
    "sparsifiner_deit_small_patch16_224.deit_in1k": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
        hf_hub_id="timm/deit_small_patch16_224.fb_in1k", notes=(_DEIT_NOTE,)),
    "sparsifiner_deit_tiny_patch16_224.deit_in1k": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
        hf_hub_id="timm/deit_tiny_patch16_224.fb_in1k", notes=(_DEIT_NOTE,)),
    "sparsifiner_lvvit_s_224.tl_in1k": _cfg(
        url="https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/lvvit_s-26M-224-83.3.pth.tar",
        crop_pct=0.9, first_conv="patch_embed.conv1", classifier=("head", "aux_head"), notes=(_LVVIT_NOTE,),
        paper_ids=("arXiv:2303.13755", "arXiv:2104.10858")),   # + LV-ViT / token labeling
})


@register_model
def sparsifiner_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-S (d 384, depth 12, 6 heads), keep rate 0.25, predictor rank N/6."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_sparsifiner("sparsifiner_deit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def sparsifiner_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-Ti (d 192, depth 12, 3 heads); the small-scale / digits variant."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_sparsifiner("sparsifiner_deit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def sparsifiner_lvvit_s_224(pretrained: bool = False, **kwargs) -> SparsifinerLVViT:
    """Sparsifiner on LV-ViT-S (d 384, depth 16, 6 heads, MLP 3, conv stem, skip_lam 2, aux head)."""
    args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0)
    return _create_sparsifiner("sparsifiner_lvvit_s_224", pretrained, model_cls=SparsifinerLVViT,
                               **dict(args, **kwargs))
