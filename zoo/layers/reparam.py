"""Structurally re-parameterisable conv blocks (Conv-BN, BN-Conv, BN-Conv + skip, RepVGG-style
depthwise conv with a small parallel branch).

Every block trains with separate branches / BatchNorm and has ``fuse()`` returning a single
``nn.Conv2d`` that computes the same function in eval mode (BatchNorm running statistics). The name
``fuse`` is what ``timm.utils.reparameterize_model`` looks for first: it replaces the child with the
returned module. :func:`reparameterize_modules` does the same walk in place.

The fused weights are computed in float64 and cast back, so fused and unfused models agree to
float32 rounding even for deep networks.
"""
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'ConvBn', 'BnConv', 'BnConvSkip', 'RepDwConv',
    'fuse_conv_bn_weights', 'fuse_bn_conv_weights', 'reparameterize_modules',
]


def _check_kernel(kernel_size: int, what: str) -> int:
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f'{what} must be a positive int, got {kernel_size!r}')
    return kernel_size


def _bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(x) == x * scale + shift in eval mode, in float64."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def fuse_conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv equivalent to ``bn(conv(x))`` (any kernel, stride, padding, groups)."""
    scale, shift = _bn_scale_shift(bn)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = shift if conv.bias is None else shift + conv.bias.double() * scale
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def fuse_bn_conv_weights(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv equivalent to ``conv(bn(x))``; exact only for an unpadded conv."""
    scale, shift = _bn_scale_shift(bn)
    w = conv.weight.double()
    groups = conv.groups
    cout, cin_g = w.shape[:2]
    cout_g = cout // groups
    # weight[o, i] reads input channel group(o) * cin_g + i
    in_scale = scale.view(groups, 1, cin_g).expand(groups, cout_g, cin_g).reshape(cout, cin_g)
    fused_w = w * in_scale[:, :, None, None]
    fused_b = torch.bmm(w.sum((2, 3)).view(groups, cout_g, cin_g), shift.view(groups, cin_g, 1)).reshape(cout)
    if conv.bias is not None:
        fused_b = fused_b + conv.bias.double()
    return fused_w.to(conv.weight.dtype), fused_b.to(conv.weight.dtype)


def _new_conv(ref: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    m = nn.Conv2d(
        ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride, padding=ref.padding,
        dilation=ref.dilation, groups=ref.groups, bias=True, padding_mode=ref.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        m.weight.copy_(weight)
        m.bias.copy_(bias)
    return m


class ConvBn(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d; ``fuse()`` folds the BN into the conv."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            padding: Union[int, None] = None,
            groups: int = 1,
            bn_weight_init: float = 1.0,
    ):
        super().__init__()
        _check_kernel(kernel_size, 'kernel_size')
        padding = kernel_size // 2 if padding is None else padding
        self.add_module('conv', nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(out_chs))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def fuse_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return fuse_conv_bn_weights(self.conv, self.bn)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return _new_conv(self.conv, *self.fuse_weights())


class BnConv(nn.Sequential):
    """BatchNorm2d followed by a bias-free Conv2d without padding.

    BN-before-conv folds exactly only when the conv sees no zero padding (padded zeros would not
    have been shifted by the BN), so padding is fixed at 0.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        _check_kernel(kernel_size, 'kernel_size')
        self.add_module('bn', nn.BatchNorm2d(in_chs))
        self.add_module('conv', nn.Conv2d(in_chs, out_chs, kernel_size, stride, 0, groups=groups, bias=False))

    def fuse_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return fuse_bn_conv_weights(self.bn, self.conv)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return _new_conv(self.conv, *self.fuse_weights())


class BnConvSkip(nn.Module):
    """``x + conv1x1(bn(x))``; fuses into one 1x1 conv with the identity added to its kernel."""

    def __init__(self, dim: int, groups: int = 1):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, dim, 1, 1, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.bn(x))

    def fuse_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        w, b = fuse_bn_conv_weights(self.bn, self.conv)
        cin_g = w.shape[1]
        ident = torch.zeros_like(w)
        out_idx = torch.arange(w.shape[0], device=w.device)
        ident[out_idx, out_idx % cin_g, 0, 0] = 1.0
        return w + ident, b

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return _new_conv(self.conv, *self.fuse_weights())


def _default_small_kernel(kernel_size: int) -> int:
    # k // 2 (7 -> 3 as in the FFNet paper), rounded up to odd so both branches stay centred
    return (kernel_size // 2) | 1


class RepDwConv(nn.Module):
    """RepVGG-style depthwise conv: a ``k x k`` Conv-BN plus a parallel smaller centred Conv-BN.

    ``out_chs`` may be a multiple of ``in_chs`` (channel multiplier, groups = in_chs). ``fuse()``
    zero-pads the small kernel to ``k x k`` by ``(k - k_small) // 2`` on each side, which is exact for
    any odd pair of kernel sizes and any stride (both branches use centred 'same' padding).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int = None,
            kernel_size: int = 7,
            stride: int = 1,
            small_kernel_size: int = None,
    ):
        super().__init__()
        out_chs = in_chs if out_chs is None else out_chs
        if out_chs % in_chs:
            raise ValueError(f'RepDwConv out_chs ({out_chs}) must be a multiple of in_chs ({in_chs})')
        small_kernel_size = _default_small_kernel(kernel_size) if small_kernel_size is None else small_kernel_size
        if kernel_size % 2 == 0 or small_kernel_size % 2 == 0 or small_kernel_size > kernel_size:
            raise ValueError(
                f'RepDwConv needs odd kernel sizes with small <= large, got kernel_size={kernel_size}, '
                f'small_kernel_size={small_kernel_size}')
        self.kernel_size = kernel_size
        self.small_kernel_size = small_kernel_size
        self.conv_kxk = ConvBn(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=in_chs)
        self.conv_small = ConvBn(in_chs, out_chs, small_kernel_size, stride, small_kernel_size // 2, groups=in_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_kxk(x) + self.conv_small(x)

    def fuse_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        w, b = self.conv_kxk.fuse_weights()
        w1, b1 = self.conv_small.fuse_weights()
        p = (self.kernel_size - self.small_kernel_size) // 2
        return w + F.pad(w1, [p, p, p, p]), b + b1

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return _new_conv(self.conv_kxk.conv, *self.fuse_weights())


def reparameterize_modules(module: nn.Module) -> nn.Module:
    """In-place: replace every descendant that has ``fuse()`` by its fused module.

    Same walk as ``timm.utils.reparameterize_model(model, inplace=True)`` restricted to ``fuse``;
    returns ``module`` for chaining.
    """
    for name, child in module.named_children():
        if hasattr(child, 'fuse'):
            setattr(module, name, child.fuse())
        else:
            reparameterize_modules(child)
    return module
