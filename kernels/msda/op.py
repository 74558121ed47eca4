# SPDX-License-Identifier: Apache-2.0
# Derived from IDEA-Research/detrex (Apache-2.0; Copyright 2022 - present, IDEA, Inc); see THIRD_PARTY_NOTICES.md
# Derived from fundamentalvision/Deformable-DETR (Apache-2.0; Copyright (c) 2020 SenseTime. All Rights Reserved); see THIRD_PARTY_NOTICES.md
"""Multi-scale deformable attention (Deformable-DETR's MSDeformAttn), the op and the module.

``ms_deform_attn`` samples, for every query, head, level and point, the value map of that level
bilinearly at a learnt location and sums the samples with attention weights. Sampling matches
``F.grid_sample(mode='bilinear', padding_mode, align_corners)`` on ``2*loc - 1`` exactly.

Backends
  * ``"triton"`` (default for CUDA tensors): fused gather kernels, forward and backward; the
    backward recomputes the sampling. grad_value is scattered with fp32 atomics (summation order
    varies run to run) unless ``deterministic=True`` (or torch's deterministic mode is on), which
    sorts the contributions by value row and sums each row in a fixed order.
  * ``"reference"`` (default elsewhere): per-level ``grid_sample`` over chunks of queries so the
    (N·M, D, Lq, P) sample tensors never exist for all queries at once; with several chunks each is
    checkpointed (the backward recomputes it). Deterministic on CPU. Computes in fp32 (fp64 for
    fp64 inputs).

Inputs may be any floating dtype (value, locations and weights need not agree, e.g. fp32
locations with fp16 value under autocast); the output has value's dtype, accumulation is fp32.
The query axis is free: callers that attend only a data-dependent subset of queries (Focus-DETR's
foreground tokens) just pass the gathered rows.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from . import triton as _tk

__all__ = ["ms_deform_attn", "MultiScaleDeformableAttention", "ms_deform_attn_grid_sample"]

_PADDING_MODES = ("zeros", "border")
_BACKENDS = ("reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# element budget of one chunk's per-level sample tensors (N*M*D*Qc*P summed over levels) in the
# reference path: 2**23 fp32 elements = 32 MiB, a few times that live during a chunk's backward
_REF_CHUNK_ELEMS = 1 << 23


def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or on any device under TRITON_INTERPRET=1 (the CPU tests)."""
    if not _tk.AVAILABLE:
        return False
    return device.type == "cuda" or _tk.INTERPRETER


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  padding_mode) -> Tuple[Tuple[Tuple[int, int], ...], torch.Tensor, torch.Tensor]:
    """Validate shapes/dtypes/devices; return ((h, w), ...) plus shapes and starts as int64 on
    value's device."""
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"ms_deform_attn: padding_mode must be one of {_PADDING_MODES}, "
                         f"got {padding_mode!r}")
    names = ("value", "sampling_locations", "attention_weights")
    for name, t in zip(names, (value, sampling_locations, attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"ms_deform_attn: {name} must be float16/bfloat16/float32/float64, "
                            f"got {t.dtype}")
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape "
                         f"{tuple(sampling_locations.shape)}")
    _, Lq, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M:
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} "
                         f"does not match value (N={N}, M={M}); expected ({N}, Lq, {M}, L, P, 2)")
    if tuple(attention_weights.shape) != (N, Lq, M, L, P):
        raise ValueError(f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = "
                         f"{(N, Lq, M, L, P)}, got {tuple(attention_weights.shape)}")
    if not isinstance(spatial_shapes, torch.Tensor) and not isinstance(level_start_index, torch.Tensor):
        # Python (h, w) pairs: checked without a host sync, so torch.compile / export trace through
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
        if len(shapes) != L:
            raise ValueError(f"ms_deform_attn: spatial_shapes must hold L={L} (h, w) pairs, got {list(shapes)}")
        starts = None if level_start_index is None else [int(i) for i in level_start_index]
    else:
        shapes, starts = _shapes_from_tensors(spatial_shapes, level_start_index, L)
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {list(shapes)}")
    expect, acc = [], 0
    for h, w in shapes:
        expect.append(acc)
        acc += h * w
    if acc != S:
        raise ValueError(f"ms_deform_attn: value has S={S} tokens but spatial_shapes {list(shapes)} "
                         f"sum to {acc}")
    if starts is not None and starts != expect:
        raise ValueError(f"ms_deform_attn: level_start_index {starts} must be the running sum of "
                         f"h*w, i.e. {expect}")
    dev = value.device
    shapes_t = torch.tensor(shapes, dtype=torch.int64).reshape(L, 2).to(dev)
    starts_t = torch.tensor(expect, dtype=torch.int64).to(dev)
    return shapes, shapes_t, starts_t


def _shapes_from_tensors(spatial_shapes, level_start_index, L):
    """(h, w) pairs and level starts (None if not given) read from tensors (one host sync)."""
    if not isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64)
    if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype == torch.bool \
            or tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be an integer (L, 2) = ({L}, 2) tensor "
                         f"of (h, w), got {spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    if level_start_index is None:
        level_start_index = torch.zeros(L, dtype=torch.int64)
        level_start_index[1:] = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cpu().cumsum(0)[:-1]
    if not isinstance(level_start_index, torch.Tensor):
        level_start_index = torch.as_tensor(level_start_index, dtype=torch.int64)
    if level_start_index.dtype.is_floating_point or level_start_index.dtype == torch.bool \
            or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"ms_deform_attn: level_start_index must be an integer ({L},) tensor, got "
                         f"{level_start_index.dtype} {tuple(level_start_index.shape)}")
    # one host sync for both small tensors
    both = torch.cat([spatial_shapes.reshape(-1).to("cpu", torch.int64),
                      level_start_index.to("cpu", torch.int64)]).tolist()
    shapes = tuple((int(both[2 * i]), int(both[2 * i + 1])) for i in range(L))
    return shapes, both[2 * L:]


# ------------------------------------------------------------------------------------------------
# reference path
# ------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _value_levels(value, shapes, dtype):
    """(N, S, M, D) -> per level (N*M, D, h, w) in ``dtype``: a view with the channels of a pixel
    adjacent (no copy for contiguous value), the layout grid_sample gathers fastest on CPU."""
    N, S, M, D = value.shape
    # split (not slicing): its backward concatenates the level grads instead of zero-padding each
    parts = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    return [p.flatten(2).transpose(1, 2).reshape(N * M, D, h, w) for p, (h, w) in zip(parts, shapes)]


def _sample_chunk(levels, loc, attn, padding_mode, align_corners):
    """Weighted per-level grid_sample for one query chunk -> (N, Qc, M*D)."""
    N, Qc, M, L, P, _ = loc.shape
    grid = 2.0 * loc - 1.0
    out = None
    for lvl, v in enumerate(levels):
        g = grid[:, :, :, lvl].transpose(1, 2).reshape(N * M, Qc, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode=padding_mode,
                          align_corners=align_corners)  # (N*M, D, Qc, P)
        a = attn[:, :, :, lvl].transpose(1, 2).reshape(N * M, 1, Qc, P)
        part = (s * a).sum(-1)
        out = part if out is None else out + part
    D = out.shape[1]
    return out.view(N, M * D, Qc).transpose(1, 2)


def _chunk_size(N, M, D, L, P) -> int:
    return max(1, _REF_CHUNK_ELEMS // max(1, N * M * D * L * P))


def _reference(value, loc, attn, shapes, padding_mode, align_corners):
    """Chunked grid_sample formulation. One chunk: plain autograd. Several: each chunk runs under
    non-reentrant checkpointing, so a backward pass recomputes the chunk's samples instead of keeping
    (N*M, D, Lq, P) tensors for every query alive."""
    cdt = _compute_dtype(value, loc, attn)
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    levels = _value_levels(value, shapes, cdt)

    def chunk(lc, ac, *lv):
        return _sample_chunk(lv, lc.to(cdt), ac.to(cdt), padding_mode, align_corners)

    step = _chunk_size(N, M, D, L, P)
    if Lq <= step:
        return chunk(loc, attn, *levels).to(value.dtype)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (value, loc, attn))
    outs = []
    for q0 in range(0, Lq, step):
        args = (loc[:, q0:q0 + step], attn[:, q0:q0 + step], *levels)
        outs.append(checkpoint(chunk, *args, use_reentrant=False) if grad else chunk(*args))
    return torch.cat(outs, 1).to(value.dtype)


# ------------------------------------------------------------------------------------------------
# triton path
# ------------------------------------------------------------------------------------------------
class _MSDATriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, value, loc, attn, shapes_t, starts_t, padding_mode, align_corners, deterministic):
        value, loc, attn = value.contiguous(), loc.contiguous(), attn.contiguous()
        border = padding_mode == "border"
        ctx.save_for_backward(value, loc, attn, shapes_t, starts_t)
        ctx.cfg = (border, bool(align_corners), bool(deterministic))
        return _tk.forward(value, shapes_t, starts_t, loc, attn, border, bool(align_corners))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, loc, attn, shapes_t, starts_t = ctx.saved_tensors
        border, align, deterministic = ctx.cfg
        need_v, need_loc, need_attn = ctx.needs_input_grad[:3]
        if not (need_v or need_loc or need_attn):
            return (None,) * 8
        g_value, g_loc, g_attn = _tk.backward(
            value, shapes_t, starts_t, loc, attn, grad_out.contiguous(), border, align,
            need_value=need_v, deterministic=deterministic)
        return (g_value.to(value.dtype) if need_v else None,
                g_loc.to(loc.dtype) if need_loc else None,
                g_attn.to(attn.dtype) if need_attn else None,
                None, None, None, None, None)


# ------------------------------------------------------------------------------------------------
# public op
# ------------------------------------------------------------------------------------------------
def ms_deform_attn(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: Optional[torch.Tensor],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        *,
        padding_mode: str = "zeros",
        align_corners: bool = False,
        backend: Optional[str] = None,
        deterministic: bool = False,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR shapes).

    Args:
        value: (N, S, M, D), S = sum of h*w over levels, levels concatenated row-major.
        spatial_shapes: (L, 2) integer (h, w) per level: a tensor, or a sequence of Python int pairs
            (read without a device sync, which torch.compile / torch.export need).
        level_start_index: (L,) running sum of h*w (None: computed); a tensor, or Python ints.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); [0, 1] is the map, values outside
            are allowed and follow ``padding_mode``.
        attention_weights: (N, Lq, M, L, P), used as given (callers softmax them).
        padding_mode: "zeros" or "border" (as grid_sample).
        align_corners: as grid_sample.
        backend: None (triton on CUDA, reference otherwise), "reference" or "triton".
        deterministic: bitwise reproducible backward (Triton: sorted gather for grad_value instead
            of atomics). Also switched on by ``torch.use_deterministic_algorithms(True)``.

    Returns:
        (N, Lq, M*D) in value's dtype.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"ms_deform_attn: value must be a torch.Tensor, got {type(value).__name__}")
    if backend not in (None,) + _BACKENDS:
        raise ValueError(f"ms_deform_attn: backend must be None, 'reference' or 'triton', got {backend!r}")
    shapes, shapes_t, starts_t = _check_inputs(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights, padding_mode)
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if backend is None:
        backend = "triton" if value.device.type == "cuda" and _tk.AVAILABLE else "reference"
    if backend == "triton":
        if not _tk.AVAILABLE:
            raise RuntimeError("ms_deform_attn: backend='triton' needs the triton package; install it "
                               "or use backend='reference'")
        if not _triton_usable(value.device):
            raise ValueError(f"ms_deform_attn: backend='triton' needs CUDA tensors (got {value.device}); "
                             "use backend='reference' or set TRITON_INTERPRET=1 before importing triton")
        if _tk.INTERPRETER and torch.bfloat16 in (value.dtype, sampling_locations.dtype,
                                                 attention_weights.dtype):
            raise TypeError("ms_deform_attn: the Triton interpreter computes bfloat16 wrongly; use "
                            "float16/float32 or backend='reference'")
        return _MSDATriton.apply(value, sampling_locations, attention_weights, shapes_t, starts_t,
                                 padding_mode, bool(align_corners), deterministic)
    if deterministic and value.device.type == "cuda" and torch.is_grad_enabled() and \
            any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        raise RuntimeError("ms_deform_attn: backend='reference' on CUDA backpropagates through "
                           "grid_sample's atomics and is not deterministic; use backend='triton'")
    return _reference(value, sampling_locations, attention_weights, shapes, padding_mode,
                      bool(align_corners))


def ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights,
                               padding_mode="zeros", align_corners=False):
    """The classic un-chunked formulation (all samples of all queries at once, autograd through
    grid_sample). Kept as a baseline for tests and benchmarks; memory grows with Lq·L·P·M·D."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode=padding_mode,
                                     align_corners=align_corners))
    a = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------------
class MultiScaleDeformableAttention(nn.Module):
    """Deformable-DETR attention block with detrex's parameter names, init and call signature, so
    detrex / Focus-DETR / DINO checkpoints load by name (``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``).

    Returns ``identity + dropout(output_proj(msda(...)))``. ``key`` is accepted and ignored, as in
    detrex; extra keyword arguments of detrex's transformer layers are ignored too.
    """

    def __init__(
            self,
            embed_dim: int = 256,
            num_heads: int = 8,
            num_levels: int = 4,
            num_points: int = 4,
            img2col_step: int = 64,
            dropout: float = 0.1,
            batch_first: bool = False,
            padding_mode: str = "zeros",
            align_corners: bool = False,
            backend: Optional[str] = None,
            deterministic: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MultiScaleDeformableAttention: embed_dim ({embed_dim}) must be divisible "
                             f"by num_heads ({num_heads})")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"MultiScaleDeformableAttention: padding_mode must be one of "
                             f"{_PADDING_MODES}, got {padding_mode!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.im2col_step = img2col_step  # kept for config compatibility; unused
        self.batch_first = batch_first
        self.padding_mode = padding_mode
        self.align_corners = align_corners
        self.backend = backend
        self.deterministic = deterministic
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self):
        """Deformable-DETR init: offsets start on a ring of head directions, point i at radius i+1
        (zero weight, so the initial pattern ignores the query); uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # onto the unit square
        radius = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = direction[:, None, None, :] * radius[None, None, :, None]
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling_locations(self, query, reference_points, spatial_shapes):
        """query (N, Lq, C) (with pos added), reference_points (N, Lq, L, 2|4) -> (N, Lq, M, L, P, 2)."""
        N, Lq, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        if reference_points is None or reference_points.dim() != 4 or \
                tuple(reference_points.shape[:3]) != (N, Lq, L) or reference_points.shape[-1] not in (2, 4):
            got = None if reference_points is None else tuple(reference_points.shape)
            raise ValueError(f"MultiScaleDeformableAttention: reference_points must be (N, Lq, L, 2) points "
                             f"or (N, Lq, L, 4) boxes with N={N}, Lq={Lq}, L={L}; got {got}")
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (w, h)
            wh = spatial_shapes.flip(-1).to(offsets.dtype).to(offsets.device)
            return ref + offsets / wh[None, None, None, :, None, :]
        # boxes (cx, cy, w, h): offsets span half the box over P points
        return ref[..., :2] + offsets / P * ref[..., 2:] * 0.5

    def forward(
            self,
            query: torch.Tensor,
            key: Optional[torch.Tensor] = None,
            value: Optional[torch.Tensor] = None,
            identity: Optional[torch.Tensor] = None,
            query_pos: Optional[torch.Tensor] = None,
            key_padding_mask: Optional[torch.Tensor] = None,
            reference_points: Optional[torch.Tensor] = None,
            spatial_shapes: Optional[torch.Tensor] = None,
            level_start_index: Optional[torch.Tensor] = None,
            **kwargs,
    ) -> torch.Tensor:
        """query/value/identity (N, L, C) if batch_first else (L, N, C); key_padding_mask (N, S),
        True = padding (zeroed in the projected value)."""
        if spatial_shapes is None:
            raise ValueError("MultiScaleDeformableAttention: spatial_shapes (L, 2) is required")
        shapes_arg = spatial_shapes  # Python (h, w) pairs stay Python for the op (no host sync)
        if not isinstance(spatial_shapes, torch.Tensor):
            spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64, device=query.device)
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.transpose(0, 1)
            value = value.transpose(0, 1)
        if query.dim() != 3 or query.shape[-1] != self.embed_dim or value.dim() != 3 \
                or value.shape[-1] != self.embed_dim or value.shape[0] != query.shape[0]:
            raise ValueError(f"MultiScaleDeformableAttention: query and value must be "
                             f"{'(N, L, C)' if self.batch_first else '(L, N, C)'} with C={self.embed_dim} "
                             f"and the same batch; got {tuple(query.shape)} and {tuple(value.shape)}")
        if spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(f"MultiScaleDeformableAttention: built for {self.num_levels} levels, "
                             f"spatial_shapes has {spatial_shapes.shape[0]}")
        N, S, _ = value.shape
        v = self.value_proj(value)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise ValueError(f"MultiScaleDeformableAttention: key_padding_mask must be (N, S) = "
                                 f"{(N, S)}, got {tuple(key_padding_mask.shape)}")
            v = v.masked_fill(key_padding_mask.bool()[..., None], 0.0)
        v = v.view(N, S, self.num_heads, self.head_dim)
        Lq = query.shape[1]
        attn = self.attention_weights(query).view(N, Lq, self.num_heads, self.num_levels * self.num_points)
        attn = attn.softmax(-1).view(N, Lq, self.num_heads, self.num_levels, self.num_points)
        loc = self.sampling_locations(query, reference_points, spatial_shapes)
        out = ms_deform_attn(v, shapes_arg, level_start_index, loc, attn,
                             padding_mode=self.padding_mode, align_corners=self.align_corners,
                             backend=self.backend, deterministic=self.deterministic)
        out = self.output_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.dropout(out) + identity
