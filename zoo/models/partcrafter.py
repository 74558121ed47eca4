# SPDX-License-Identifier: Apache-2.0 AND MIT
# Derived from wgsxm/PartCrafter (MIT; Copyright (c) 2025 Yuchen Lin); see THIRD_PARTY_NOTICES.md
"""PartCrafter: "Structured 3D Mesh Generation via Compositional Latent Diffusion Transformers"
(Lin et al., NeurIPS 2025, arXiv 2506.05573) — the part-wise latent DiT.

An object is a set of n parts, each part T latent tokens. Every part gets a time token in front
and a learned part-ID embedding added to all of its tokens. The DiT (TripoSG / HunyuanDiT blocks:
pre-norm, q/k RMSNorm, U-ViT long skips) alternates *local* blocks, where a part attends only to
itself, and *global* blocks, where all parts of one object attend to each other.

Here a whole batch of objects with different part counts is packed into one token sequence and
each block makes one ``zoo.kernels.attention`` call with a varlen layout (per part or per object),
instead of upstream's per-object Python loop and reshapes. Cross-attention to the image tokens
uses a segment layout mapping every token to its object's condition tokens; upstream's global
cross-attention (first part's condition, queries of all parts) and local cross-attention (each
part its own copy) compute the same thing, as softmax is per query.

Implemented from the paper and the published architecture facts (the upstream transformer file is
under the Tencent Hunyuan Community License; no code taken from it). ``checkpoint_filter_fn`` reads
the diffusers-format transformer weights (HF ``wgsxm/PartCrafter``), including the head-major
q/k/v packing those weights were trained with.
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_function

import zoo.kernels as _kernels
from zoo.errors import NoClassifierApi, NoImageDataConfig, NotScriptable, UnsupportedError
from zoo.hub import cfg as hub_cfg
from zoo.models._builder import build_model
from zoo.layers.dit_blocks import DiTBlock, TimestepEmbedder

__all__ = ["PartCrafterDiT", "PackedParts", "pack_parts", "part_ids_for", "checkpoint_filter_fn",
           "resplit_rows", "unresplit_rows"]

PART_ID_MODES = ("reference", "fixed")


# ------------------------------------------------------------------------------------------------
# packing: which token belongs to which part and object
# ------------------------------------------------------------------------------------------------
class PackedParts:
    """Index bookkeeping for N parts (of B objects) of S tokens each, packed into one sequence.

    ``local_layout`` lets each part attend itself, ``global_layout`` each object's parts attend
    each other; ``cross_layout(M)`` maps every token to the M condition tokens of its object.
    ``counts`` (parts per object) is a 1-D integer tensor, or a sequence of Python ints: then every
    index is built from Python values, nothing waits on the device, and torch.compile / export
    trace the model without a graph break.
    """

    def __init__(self, counts: Union[torch.Tensor, Sequence[int]], tokens_per_part: int, device=None):
        self.S = tokens_per_part
        if isinstance(counts, torch.Tensor):
            dev = counts.device
            self.num_objects = int(counts.numel())
            self.num_parts = int(counts.sum())
            self.part_object = torch.repeat_interleave(torch.arange(self.num_objects, device=dev), counts)  # (N,)
            self.first_part = torch.cumsum(counts, 0) - counts  # (B,) index of each object's first part
        else:
            counts = [int(c) for c in counts]
            dev = device
            self.num_objects, self.num_parts = len(counts), sum(counts)
            starts = [sum(counts[:b]) for b in range(len(counts))]
            self.part_object = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], dtype=torch.long,
                                            device=dev)
            self.first_part = torch.tensor(starts, dtype=torch.long, device=dev)
            counts = torch.tensor(counts, dtype=torch.long, device=dev)
        self.counts = counts
        self.device = dev
        self.local_layout = _kernels.segments(self.token_ids("part"))
        self.global_layout = _kernels.segments(self.token_ids("object"))

    def token_ids(self, per: str) -> torch.Tensor:
        part = torch.arange(self.num_parts, device=self.device)
        ids = part if per == "part" else self.part_object
        return ids.repeat_interleave(self.S)[None]

    def cross_layout(self, num_ctx: int, per: str = "object"):
        """Segment layout from the packed queries to packed condition tokens, one set of ``num_ctx``
        per object (``per='object'``) or per part (``per='part'``)."""
        groups = self.num_objects if per == "object" else self.num_parts
        kv = torch.arange(groups, device=self.device).repeat_interleave(num_ctx)[None]
        return _kernels.segments(self.token_ids(per), kv)


_NUM_PARTS_HELP = ("num_parts must be None (every row its own object), an int (every object has that many parts), "
                   "a sequence of Python ints or a 1-D integer tensor (parts per object)")


def _counts_from(num_parts, N: int, device) -> Union[torch.Tensor, List[int]]:
    """Parts per object: a list of Python ints unless ``num_parts`` is a tensor."""
    if num_parts is None:
        return [1] * N
    if isinstance(num_parts, bool):
        raise ValueError(f"{_NUM_PARTS_HELP}, got a bool")
    if isinstance(num_parts, int):
        if num_parts < 1 or N % num_parts:
            raise ValueError(f"num_parts={num_parts} (int: every object has that many parts) must divide the "
                             f"number of part rows N={N}")
        return [num_parts] * (N // num_parts)
    if isinstance(num_parts, (list, tuple)):
        if not num_parts or not all(isinstance(c, int) and not isinstance(c, bool) for c in num_parts):
            raise ValueError(f"{_NUM_PARTS_HELP}, got {num_parts!r}")
        if min(num_parts) < 1 or sum(num_parts) != N:
            raise ValueError(f"num_parts {list(num_parts)} must be >= 1 each and sum to the number of part rows N={N}")
        return list(num_parts)
    if not isinstance(num_parts, torch.Tensor) or num_parts.dim() != 1 or num_parts.dtype.is_floating_point:
        raise ValueError(f"{_NUM_PARTS_HELP}, got {type(num_parts).__name__}")
    counts = num_parts.to(device=device, dtype=torch.long)
    if bool((counts < 1).any()) or int(counts.sum()) != N:
        raise ValueError(f"num_parts {counts.tolist()} must be >= 1 each and sum to the number of part rows N={N}")
    return counts


def part_ids_for(num_parts, counts: Union[torch.Tensor, Sequence[int]], mode: str = "reference",
                 device=None) -> torch.Tensor:
    """Part-ID embedding index of every part row (``counts``: parts per object, tensor or ints).

    Per-object ``arange(n_i)``, except for an *int* ``num_parts`` in ``"reference"`` mode: then
    upstream's inference rule, ``arange(N)`` over all rows, so under classifier-free guidance (rows
    [uncond parts, cond parts]) the conditional parts get ids n..2n-1 (wgsxm/PartCrafter#23).
    """
    if mode not in PART_ID_MODES:
        raise ValueError(f"part_id_mode must be one of {PART_ID_MODES}, got {mode!r}")
    reference_int = mode == "reference" and isinstance(num_parts, int) and not isinstance(num_parts, bool)
    if not isinstance(counts, torch.Tensor):
        counts = [int(c) for c in counts]
        ids = list(range(sum(counts))) if reference_int else [i for n in counts for i in range(n)]
        return torch.tensor(ids, dtype=torch.long, device=device)
    N = int(counts.sum())
    if reference_int:
        return torch.arange(N, device=counts.device)
    start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.arange(N, device=counts.device) - start


def pack_parts(num_parts, N: int, tokens_per_part: int, device=None) -> PackedParts:
    return PackedParts(_counts_from(num_parts, N, device), tokens_per_part, device)


def _max_part_id(num_parts, counts, mode: str) -> int:
    """Largest id :func:`part_ids_for` gives, from Python values where ``counts`` are ints."""
    if isinstance(counts, torch.Tensor):
        return int(part_ids_for(num_parts, counts, mode).max())
    if mode == "reference" and isinstance(num_parts, int) and not isinstance(num_parts, bool):
        return sum(counts) - 1
    return max(counts) - 1


@register_notrace_function
def _grad_ckpt(block, *args):
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
class PartCrafterDiT(NoClassifierApi, NotScriptable, nn.Module):
    """Part-wise latent DiT: ``forward(x, timestep, context, num_parts) -> velocity``.

    Args:
        in_chans: latent channels per token (64 for the TripoSG VAE).
        embed_dim, depth, num_heads, mlp_ratio: DiT width, blocks, heads, FFN ratio.
        context_dim: width of the condition tokens (DINOv2-L: 1024).
        max_num_parts: size of the part-ID embedding table.
        global_block_ids: blocks with object-wide attention; default the even ids (upstream).
        part_id_mode: ``"reference"`` (upstream, incl. the CFG id shift for int ``num_parts``) or
            ``"fixed"`` (ids ``arange(n)`` per object always).
        enable_local_cross_attn / enable_global_cross_attn: False feeds zero condition tokens to
            that kind of block (upstream's switches).
    """
    _supported_calls = "forward(**model.example_inputs()) (velocity of packed part latents)"

    def __init__(self, in_chans: int = 64, embed_dim: int = 2048, depth: int = 21, num_heads: int = 16,
                 context_dim: int = 1024, max_num_parts: int = 32, mlp_ratio: float = 4.0,
                 global_block_ids: Optional[Sequence[int]] = None, part_id_mode: str = "reference",
                 use_part_embedding: bool = True, enable_local_cross_attn: bool = True,
                 enable_global_cross_attn: bool = True, qk_norm: bool = True, **kwargs):
        super().__init__()
        for k in ("pretrained_cfg", "pretrained_cfg_overlay"):
            kwargs.pop(k, None)
        for k in ("num_classes", "global_pool"):  # classifier arguments: only their "none" values
            if kwargs.pop(k, None) not in (None, 0, ""):
                raise UnsupportedError(f"PartCrafterDiT({k}=...): a velocity model has no classifier; build it "
                                       "without it and call forward(**model.example_inputs())")
        if kwargs:
            raise TypeError(f"PartCrafterDiT got unexpected arguments {sorted(kwargs)}")
        if part_id_mode not in PART_ID_MODES:
            raise ValueError(f"part_id_mode must be one of {PART_ID_MODES}, got {part_id_mode!r}")
        self.in_chans = self.out_chans = in_chans
        self.num_classes = 0  # a velocity model: no classifier
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.num_heads, self.context_dim = depth, num_heads, context_dim
        self.max_num_parts = max_num_parts
        self.part_id_mode = part_id_mode
        self.enable_local_cross_attn = enable_local_cross_attn
        self.enable_global_cross_attn = enable_global_cross_attn
        if global_block_ids is None:
            global_block_ids = range(0, depth, 2)
        self.global_block_ids = tuple(sorted(int(i) for i in global_block_ids))
        if any(i < 0 or i >= depth for i in self.global_block_ids):
            raise ValueError(f"global_block_ids {self.global_block_ids} must lie in [0, depth={depth})")
        self.grad_checkpointing = False

        self.time_embed = TimestepEmbedder(embed_dim, int(embed_dim * mlp_ratio))
        self.part_embedding = nn.Embedding(max_num_parts, embed_dim) if use_part_embedding else None
        self.proj_in = nn.Linear(in_chans, embed_dim)
        half = depth // 2
        self.blocks = nn.ModuleList([
            DiTBlock(embed_dim, num_heads, context_dim, mlp_ratio=mlp_ratio, skip=i > half, qk_norm=qk_norm)
            for i in range(depth)])
        self.norm_out = nn.LayerNorm(embed_dim)
        self.proj_out = nn.Linear(embed_dim, in_chans)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.part_embedding is not None:
            nn.init.normal_(self.part_embedding.weight, std=0.02)

    # timm-style helpers -------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^time_embed|^part_embedding|^proj_in",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm_out|^proj_out", (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"part_embedding.weight"}

    def is_global(self, i: int) -> bool:
        return i in self.global_block_ids

    @torch.jit.ignore
    def example_inputs(self, batch_size: int = 1, device=None, dtype=None, num_parts: int = 4,
                       tokens_per_part: int = 1024, context_tokens: int = 257) -> Dict[str, torch.Tensor]:
        """Random ``forward`` keyword inputs for ``batch_size`` objects of ``num_parts`` parts each
        (benchmarks, export). Defaults are upstream's inference sizes: 1024 latent tokens per part
        and 257 DINOv2 image tokens. ``num_parts`` goes in as a per-object list of ints, so part ids
        are ``arange(num_parts)`` per object (the training rule) whatever the batch size, and the
        packing is known from Python values (torch.compile / export need no graph break)."""
        for k, v in (("batch_size", batch_size), ("num_parts", num_parts), ("tokens_per_part", tokens_per_part),
                     ("context_tokens", context_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"example_inputs: {k} must be an int >= 1, got {v!r}")
        if self.part_embedding is not None and num_parts > self.max_num_parts:
            raise ValueError(f"example_inputs: num_parts={num_parts} exceeds max_num_parts={self.max_num_parts}")
        dtype = dtype or torch.float32
        N = batch_size * num_parts
        return dict(x=torch.randn(N, tokens_per_part, self.in_chans, device=device, dtype=dtype),
                    timestep=torch.rand(batch_size, device=device, dtype=dtype) * 1000,
                    context=torch.randn(batch_size, context_tokens, self.context_dim, device=device, dtype=dtype),
                    num_parts=[num_parts] * batch_size)

    # forward --------------------------------------------------------------------------------------
    def _contexts(self, context: torch.Tensor, packed: PackedParts):
        """Packed condition tokens and layouts for local and global blocks."""
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must be (objects or parts, M, {self.context_dim}), got {tuple(context.shape)}")
        B, N, M = packed.num_objects, packed.num_parts, context.shape[1]
        if context.shape[0] == B:
            obj_ctx = context
            local_ctx, local_layout = obj_ctx, packed.cross_layout(M, "object")
        elif context.shape[0] == N:
            # one condition per part row (upstream's layout): local blocks read their own row,
            # global blocks the first part's row of each object
            obj_ctx = context[packed.first_part]
            local_ctx, local_layout = context, packed.cross_layout(M, "part")
        else:
            raise ValueError(f"context has {context.shape[0]} rows; expected one per object ({B}) or per part ({N})")
        global_layout = local_layout if obj_ctx is local_ctx else packed.cross_layout(M, "object")
        local_ctx = local_ctx if self.enable_local_cross_attn else torch.zeros_like(local_ctx)
        obj_ctx = obj_ctx if self.enable_global_cross_attn else torch.zeros_like(obj_ctx)
        pk = lambda c: c.reshape(1, -1, c.shape[-1])  # noqa: E731
        return (pk(local_ctx), local_layout), (pk(obj_ctx), global_layout)

    def forward(self, x: torch.Tensor, timestep: Union[torch.Tensor, float], context: torch.Tensor,
                num_parts: Union[int, torch.Tensor, None] = None, part_ids: Optional[torch.Tensor] = None):
        """
        Args:
            x: ``(N, T, in_chans)`` noisy latents, parts of all objects stacked object by object.
            timestep: scalar, ``(N,)`` per part, or ``(B,)`` per object (repeated over its parts).
            context: ``(B, M, context_dim)`` per object or ``(N, M, context_dim)`` per part.
            num_parts: parts per object as a sequence of ints or a ``(B,)`` int tensor, an int (all
                objects alike), or None (every row its own object). Python ints keep the packing
                off the device (no host sync; torch.compile / export trace it); a tensor is read once.
            part_ids: optional explicit ``(N,)`` part-ID indices (overrides ``part_id_mode``).
        Returns:
            ``(N, T, in_chans)`` prediction (the rectified-flow target ``x0 - noise``).
        """
        if x.dim() != 3 or x.shape[-1] != self.in_chans:
            raise ValueError(f"x must be (parts, tokens, {self.in_chans}), got {tuple(x.shape)}")
        N, T, _ = x.shape
        counts = _counts_from(num_parts, N, x.device)
        packed = PackedParts(counts, T + 1, x.device)
        B = packed.num_objects

        t = torch.as_tensor(timestep, device=x.device)
        if t.dim() == 0:
            t = t.expand(N)
        elif t.shape == (N,):
            pass
        elif t.shape == (B,):
            t = t[packed.part_object]
        else:
            raise ValueError(f"timestep must be a scalar, (N={N},) or (B={B},), got {tuple(t.shape)}")

        h = torch.cat([self.time_embed(t, x.dtype)[:, None], self.proj_in(x)], dim=1)  # (N, T+1, D)
        if self.part_embedding is not None:
            if part_ids is not None:
                ids = part_ids
                top = None if torch.compiler.is_compiling() else int(ids.max())  # bounds-checked by the lookup
            else:
                ids = part_ids_for(num_parts, counts, self.part_id_mode, device=x.device)
                top = _max_part_id(num_parts, counts, self.part_id_mode)
            if ids.shape != (N,):
                raise ValueError(f"part_ids must be ({N},), got {tuple(ids.shape)}")
            if top is not None and top >= self.max_num_parts:
                raise ValueError(f"part ids up to {top} exceed max_num_parts={self.max_num_parts}: use "
                                 f"fewer parts per call (in part_id_mode='reference' an int num_parts gives ids "
                                 f"0..N-1 over all rows) or part_id_mode='fixed'")
            h = h + self.part_embedding(ids.to(x.device))[:, None]
        h = h.reshape(1, N * (T + 1), -1)

        (lctx, lcross), (gctx, gcross) = self._contexts(context.to(h.dtype), packed)
        skips: List[torch.Tensor] = []
        half = self.depth // 2
        for i, blk in enumerate(self.blocks):
            g = self.is_global(i)
            args = (h, gctx if g else lctx, packed.global_layout if g else packed.local_layout,
                    gcross if g else lcross, skips.pop() if i > half else None)
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                h = _grad_ckpt(blk, *args)
            else:
                h = blk(*args)
            if i < half:
                skips.append(h)
        h = self.norm_out(h).reshape(N, T + 1, -1)[:, 1:]
        return self.proj_out(h)


# ------------------------------------------------------------------------------------------------
# checkpoint conversion
# ------------------------------------------------------------------------------------------------
def resplit_rows(w: torch.Tensor, num_heads: int, n: int) -> torch.Tensor:
    """Head-major packed projection rows -> standard ``(n, H, hd)`` rows.

    The reference weights are used as ``cat([Wq, Wk, Wv]).view(H, 3, hd)``: head h's query is
    rows ``[3h*hd, 3h*hd + hd)`` of the concatenation, not ``Wq``'s rows h*hd.. (n = 2 for k/v).
    """
    rows = w.shape[0]
    hd = rows // (n * num_heads)
    return w.reshape(num_heads, n, hd, *w.shape[1:]).transpose(0, 1).reshape(rows, *w.shape[1:])


def unresplit_rows(w: torch.Tensor, num_heads: int, n: int) -> torch.Tensor:
    """Inverse of :func:`resplit_rows` (standard rows -> the reference's concatenated rows)."""
    rows = w.shape[0]
    hd = rows // (n * num_heads)
    return w.reshape(n, num_heads, hd, *w.shape[1:]).transpose(0, 1).reshape(rows, *w.shape[1:])


_RENAMES = (
    ("time_proj.linear_1.", "time_embed.fc1."), ("time_proj.linear_2.", "time_embed.fc2."),
    (".attn1.norm_q.", ".attn.q_norm."), (".attn1.norm_k.", ".attn.k_norm."), (".attn1.to_out.0.", ".attn.proj."),
    (".attn2.norm_q.", ".cross_attn.q_norm."), (".attn2.norm_k.", ".cross_attn.k_norm."),
    (".attn2.to_out.0.", ".cross_attn.proj."), (".attn2.to_q.", ".cross_attn.q."),
    (".ff.net.0.proj.", ".mlp.fc1."), (".ff.net.2.", ".mlp.fc2."),
)


def _num_heads(state_dict, model) -> int:
    if model is not None:
        return model.num_heads
    hd = next((v.shape[0] for k, v in state_dict.items() if k.endswith("attn1.norm_q.weight")), None)
    width = next((v.shape[0] for k, v in state_dict.items() if k == "proj_in.weight"), None)
    if hd is None or width is None:
        raise ValueError("checkpoint_filter_fn needs the model (or norm_q / proj_in weights) to know the head count")
    return width // hd


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[PartCrafterDiT] = None):
    """diffusers ``PartCrafterDiTModel`` / TripoSG transformer state dict -> this module's keys.

    Accepts the separate ``to_q/to_k/to_v`` (``to_k/to_v`` for cross-attention) and the fused
    ``to_qkv`` / ``to_kv`` forms; re-orders their rows from the head-major packing to the standard
    layout (:func:`resplit_rows`). Already-converted state dicts pass through.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if not any(".attn1." in k or k.startswith("time_proj.") for k in state_dict):
        return state_dict
    H = _num_heads(state_dict, model)
    out, pending = {}, {}
    for k, v in state_dict.items():
        m = None
        for attn, parts in (("attn1", ("to_q", "to_k", "to_v", "to_qkv")), ("attn2", ("to_k", "to_v", "to_kv"))):
            for p in parts:
                tag = f".{attn}.{p}."
                if tag in k:
                    m = (k.split(tag)[0], attn, p, k.split(tag)[1])
        if m is not None:
            pending.setdefault((m[0], m[1], m[3]), {})[m[2]] = v
            continue
        nk = k
        for a, b in _RENAMES:
            nk = nk.replace(a, b)
        out[nk] = v
    for (prefix, attn, param), got in pending.items():
        if attn == "attn1":
            w = got["to_qkv"] if "to_qkv" in got else torch.cat([got[p] for p in ("to_q", "to_k", "to_v")], 0)
            out[f"{prefix}.attn.qkv.{param}"] = resplit_rows(w, H, 3)
        else:
            w = got["to_kv"] if "to_kv" in got else torch.cat([got[p] for p in ("to_k", "to_v")], 0)
            out[f"{prefix}.cross_attn.kv.{param}"] = resplit_rows(w, H, 2)
    return out


# ------------------------------------------------------------------------------------------------
# cfgs and entry points
# ------------------------------------------------------------------------------------------------
_LICENSE = ("other: Tencent Hunyuan Community License (transformer lineage; excludes the EU) — "
            "PartCrafter repo code MIT")


_INPUTS_NOTE = ("not an image model: inputs are x (N parts, T tokens, in_chans) TripoSG-VAE latents, a timestep, "
                "context (objects or parts, M, context_dim) DINOv2 image tokens and num_parts; "
                "model.example_inputs() builds them")
_DATA_NOTE = ("the part-generation pipeline (zoo.tasks.part_generation: TripoSG-VAE latents and DINOv2 image tokens "
              "computed outside this model) or model.example_inputs()")


def _cfg(url: str = "", **kwargs):
    # no image fields (input_size, mean/std, interpolation, crop) and no classifier: timm's
    # defaults would describe an ImageNet classifier
    base = dict(license=_LICENSE, paper_ids="arXiv:2506.05573",
                paper_name="PartCrafter: Structured 3D Mesh Generation via Compositional Latent Diffusion Transformers",
                origin_url="https://github.com/wgsxm/PartCrafter", num_classes=None, input_size=None,
                interpolation=None, crop_pct=None, crop_mode=None, mean=None, std=None, pool_size=None,
                first_conv=None, classifier=None)
    base.update(kwargs)
    base["notes"] = (_INPUTS_NOTE,) + tuple(base.get("notes") or ())
    return hub_cfg(url=url, sha256=None, **base) if url else hub_cfg(**base)


_HF_FILE = "transformer/diffusion_pytorch_model.safetensors"
_HF_NOTE = ("HF diffusers pipeline folder; these are the transformer/ weights (file name is the diffusers "
            "default, not verified offline)",)
default_cfgs = generate_default_cfgs({
    "partcrafter_dit.object": _cfg(hf_hub_id="wgsxm/PartCrafter", hf_hub_filename=_HF_FILE, notes=_HF_NOTE),
    "partcrafter_dit.scene": _cfg(hf_hub_id="wgsxm/PartCrafter-Scene", hf_hub_filename=_HF_FILE, notes=_HF_NOTE),
    "partcrafter_dit_small.untrained": _cfg(),
    "partcrafter_dit_tiny.untrained": _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> PartCrafterDiT:
    for k in ("features_only", "num_classes", "global_pool", "out_indices"):
        if kwargs.get(k) not in (None, False):
            raise UnsupportedError(f"create_model({variant!r}, {k}={kwargs[k]!r}) asked of a part-latent DiT, which "
                                   f"has no classifier or image features; build it without {k} and call "
                                   f"forward(**model.example_inputs())")
        kwargs.pop(k, None)
    model = build_model(PartCrafterDiT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                        feature_cfg=None, **kwargs)
    model.pretrained_cfg = model.default_cfg = NoImageDataConfig(model.pretrained_cfg, _DATA_NOTE)
    return model


@register_model
def partcrafter_dit(pretrained: bool = False, **kwargs) -> PartCrafterDiT:
    """PartCrafter DiT as released: 21 blocks, width 2048, 16 heads, 64-ch latents, 1024-d image
    tokens, 32 part ids, global attention in the even blocks."""
    base = dict(in_chans=64, embed_dim=2048, depth=21, num_heads=16, context_dim=1024, max_num_parts=32)
    return _create("partcrafter_dit", pretrained, **dict(base, **kwargs))


@register_model
def partcrafter_dit_small(pretrained: bool = False, **kwargs) -> PartCrafterDiT:
    """Small PartCrafter DiT (9 blocks, width 384, 6 heads) for single-GPU experiments."""
    base = dict(in_chans=64, embed_dim=384, depth=9, num_heads=6, context_dim=1024, max_num_parts=32)
    return _create("partcrafter_dit_small", pretrained, **dict(base, **kwargs))


@register_model
def partcrafter_dit_tiny(pretrained: bool = False, **kwargs) -> PartCrafterDiT:
    """Tiny PartCrafter DiT (5 blocks, width 64, 4 heads) for CPU tests and the embedded task."""
    base = dict(in_chans=8, embed_dim=64, depth=5, num_heads=4, context_dim=16, max_num_parts=32)
    return _create("partcrafter_dit_tiny", pretrained, **dict(base, **kwargs))
