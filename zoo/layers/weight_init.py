# SPDX-License-Identifier: Apache-2.0
"""Weight initialisers shared by the families (applied with ``module.apply``)."""
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ["init_linear_trunc_normal"]


def init_linear_trunc_normal(m: nn.Module, std: float = .02):
    """Linear: truncated normal weights (std 0.02), zero bias; LayerNorm: ones / zeros (the ViT
    family's usual init, also the TNT and GMM reference code's)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
