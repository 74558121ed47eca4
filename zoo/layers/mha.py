"""Plain multi-head attention on ``zoo.kernels.attention``.

One module for the common "project, attend, project back" pattern. The projection split is a
constructor choice because released checkpoints disagree on it (``qkv`` fused as in ViT, ``qk`` +
``v`` as in TNT, ``q`` + ``kv`` as in PVT / PyramidTNT); the parameter names follow the split so
such checkpoints load without renaming. Split projections still run as one GEMM (weights
concatenated per call), and q/k/v reach the op as strided views of its output, so no layout copy
is made on the way in; the op's output goes back through a transpose view.

Eager CPU inference (fp32, autograd off) runs the projections as oneDNN matmuls with the residual
sum or the GELU fused in (:func:`inference_linear`); everywhere else they are plain ``F.linear``.
That fast path is eager-only: under torch.compile / torch.export the helpers take the plain path
(Inductor emits its own fused GEMMs), and torch.fx keeps both helpers as leaves, so a traced
model runs the very same calls as the eager one.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

import zoo.kernels as _kernels
from zoo.layers.inplace import gelu_fresh

__all__ = ["MultiHeadAttention", "linear_residual", "inference_linear"]

_SPLITS = ("qkv", "qk_v", "q_kv")
torch.fx.wrap("gelu_fresh")     # runtime autograd branch: a leaf for torch.fx


# oneDNN matmul with fused post-ops (the op Inductor's CPU backend emits); inference only, no autograd
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def _onednn_ok(*tensors: torch.Tensor) -> bool:
    """Eager (not compiling, exporting or fx-tracing), CPU fp32 tensors, no autograd graph, and
    oneDNN present. The compile check comes first: Dynamo must never reach the private op."""
    if torch.compiler.is_compiling() or is_fx_symbolic_tracing():
        return False
    if _ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and tensors[0].numel() > 0


@torch.fx.wrap      # leaves for torch.fx (plain and timm's tracer): a traced model runs these very calls
@register_notrace_function
def inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     act: Optional[str] = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` with ``act`` None, ``'gelu'`` (erf) or ``'gelu_tanh'``.

    CPU fp32 inference runs one oneDNN matmul with the GELU as a post-op: oneDNN's GEMM is
    10-40 % faster than the default BLAS path on TNT's shapes (narrow 24-wide word projections,
    3152 x 384 x 1536 sentence MLPs), and the activation needs no second pass or buffer. The
    result equals F.linear up to fp32 summation order. Elsewhere: F.linear, then the GELU in place
    when no graph is recorded (the buffer is ours) or out of place when it is.
    """
    if act is not None and act not in _GELU_APPROX:
        raise ValueError(f"inference_linear act={act!r} is not supported; use None, 'gelu' or 'gelu_tanh'")
    if _onednn_ok(x, weight, *(() if bias is None else (bias,))):
        shape = x.shape
        if act is None:
            y = _ONEDNN_LINEAR(x.reshape(-1, shape[-1]), weight, bias, "none", [], "")
        else:
            y = _ONEDNN_LINEAR(x.reshape(-1, shape[-1]), weight, bias, "gelu", [], _GELU_APPROX[act])
        return y.view(*shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    return y if act is None else gelu_fresh(y, _GELU_APPROX[act])


@torch.fx.wrap
@register_notrace_function
def linear_residual(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)`` with the sum accumulated by the GEMM itself (beta = 1), which saves
    a full pass over the output compared with linear-then-add. Autograd-safe: the GEMM writes into
    a tensor created here. ``residual`` must have the output's shape. Under autocast or mixed
    dtypes it is plain ``residual + linear(x)`` (in-place GEMMs are not autocast). CPU fp32
    inference adds the residual as a oneDNN post-op instead (see :func:`inference_linear`)."""
    if torch.is_autocast_enabled(x.device.type) or not (x.dtype == residual.dtype == linear.weight.dtype):
        return residual + linear(x)
    n = linear.out_features
    if _onednn_ok(x, linear.weight, residual, *(() if linear.bias is None else (linear.bias,))):
        y = _ONEDNN_LINEAR.binary(x.reshape(-1, x.shape[-1]), residual.reshape(-1, n), linear.weight, linear.bias, "add")
        return y.view(residual.shape)
    base = residual.reshape(-1, n)
    base = base + linear.bias if linear.bias is not None else base.clone()
    return base.addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t()).view(residual.shape)


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose softmax runs in ``zoo.kernels.attention``.

    Args:
        dim: input / output width.
        num_heads: number of heads.
        qkv_split: ``'qkv'`` (one ``qkv`` Linear), ``'qk_v'`` (``qk`` and ``v``) or ``'q_kv'``
            (``q`` and ``kv``; the only split that accepts a separate key/value input).
        qk_dim: total width of the q and k projections (default ``dim``); v keeps ``dim``.
        qkv_bias: bias on the q/k/v projections. ``proj_bias``: bias on the output projection.
        scale: logit scale, default ``(qk_dim // num_heads) ** -0.5``.
        attn_drop: dropout on the attention probabilities (training only; the op's ``dropout_p``).
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_split: str = "qkv",
            qk_dim: Optional[int] = None,
            qkv_bias: bool = False,
            proj_bias: bool = True,
            scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        qk_dim = qk_dim or dim
        if qkv_split not in _SPLITS:
            raise ValueError(f"qkv_split={qkv_split!r} is not supported; use one of {_SPLITS}")
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"dim={dim} and qk_dim={qk_dim} must both be divisible by num_heads={num_heads}")
        if qkv_split == "qkv" and qk_dim != dim:
            raise ValueError("qkv_split='qkv' needs qk_dim == dim; use 'qk_v' or 'q_kv' for a different qk width")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.qkv_split = qkv_split
        self.scale = scale if scale is not None else (qk_dim // num_heads) ** -0.5
        if qkv_split == "qkv":
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        elif qkv_split == "qk_v":
            self.qk = nn.Linear(dim, 2 * qk_dim, bias=qkv_bias, **dd)
            self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        else:
            self.q = nn.Linear(dim, qk_dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, qk_dim + dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = float(attn_drop)

    def _heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        """(B, L, width) view -> (B, H, L, width // H) view, no copy."""
        return t.unflatten(-1, (self.num_heads, width // self.num_heads)).transpose(1, 2)

    def _fused_qkv(self, x: torch.Tensor, a: nn.Linear, b: nn.Linear) -> torch.Tensor:
        """Both projections of a split layout as one GEMM: x is read once and the narrow
        per-projection GEMMs (e.g. TNT's 24 -> 48 and 24 -> 24 on 50k words) become one."""
        w = torch.cat([a.weight, b.weight])
        bias = torch.cat([a.bias, b.bias]) if a.bias is not None else None
        return inference_linear(x, w, bias)

    def project(self, x: torch.Tensor, kv_input: Optional[torch.Tensor] = None):
        """q, k, v as (B, H, L, head_dim) strided views of the projection outputs."""
        dq, d = self.qk_dim, self.dim
        if kv_input is not None:
            if self.qkv_split != "q_kv":
                raise ValueError("a separate key/value input needs qkv_split='q_kv', "
                                 f"this module uses {self.qkv_split!r}")
            kv = inference_linear(kv_input, self.kv.weight, self.kv.bias)
            q = inference_linear(x, self.q.weight, self.q.bias)
            return self._heads(q, dq), self._heads(kv[..., :dq], dq), self._heads(kv[..., dq:], d)
        if self.qkv_split == "qkv":
            qkv = inference_linear(x, self.qkv.weight, self.qkv.bias)
        elif self.qkv_split == "qk_v":
            qkv = self._fused_qkv(x, self.qk, self.v)
        else:
            qkv = self._fused_qkv(x, self.q, self.kv)
        return (self._heads(qkv[..., :dq], dq), self._heads(qkv[..., dq:2 * dq], dq),
                self._heads(qkv[..., 2 * dq:], d))

    def forward(
            self,
            x: torch.Tensor,
            kv_input: Optional[torch.Tensor] = None,
            layout=None,
            bias=None,
            residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim). ``layout`` / ``bias`` are passed to the op unchanged.
        With ``residual`` the result is ``residual + attn(x)``, summed inside the output GEMM
        unless dropout is active."""
        B, L, _ = x.shape
        q, k, v = self.project(x, kv_input)
        out = _kernels.attention(q, k, v, layout, scale=self.scale, bias=bias,
                                 dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, L, self.dim)
        if residual is not None and not (self.training and self.proj_drop.p > 0):
            return linear_residual(out, self.proj, residual)
        out = self.proj_drop(self.proj(out))
        return out if residual is None else residual + out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, qkv_split={self.qkv_split!r}, scale={self.scale:.4g}"
