"""A tiny classifier for the weights-hub tests, registered with timm only by :func:`register`
(never by ``import zoo``, so it is not in ``zoo.list_models()``).

Its cfg urls point at a test HTTP server, whose port is known only at test time; hence a
function instead of import-time registration. Its "upstream" checkpoints use another key layout
(``features.0`` / ``features.1`` / ``classifier``) so the filter fn has real work to do.
"""
import warnings
from typing import Dict

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import generate_default_cfgs, register_model

from zoo.models._builder import build_model

ARCH = "zoo_test_tinynet"


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 8
        self.stem = nn.Conv2d(in_chans, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.global_pool, self.fc = create_classifier(8, num_classes, pool_type=global_pool)

    def reset_classifier(self, num_classes: int, global_pool: str = "avg"):
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(8, num_classes, pool_type=global_pool)

    def forward(self, x):
        return self.fc(self.global_pool(self.act(self.bn(self.stem(x)))))


_UPSTREAM_TO_ZOO = {"features.0.": "stem.", "features.1.": "bn.", "classifier.": "fc."}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Upstream layout -> zoo layout; a zoo-layout dict passes through unchanged."""
    if "stem.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        for old, new in _UPSTREAM_TO_ZOO.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def upstream_state_dict(seed: int = 0, num_classes: int = 10) -> Dict[str, torch.Tensor]:
    """Deterministic weights in the upstream layout."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in TinyNet(num_classes=num_classes).state_dict().items()}
    inverse = {new: old for old, new in _UPSTREAM_TO_ZOO.items()}
    out = {}
    for k, v in sd.items():
        for new, old in inverse.items():
            if k.startswith(new):
                k = old + k[len(new):]
                break
        out[k] = v
    return out


def zoo_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    return checkpoint_filter_fn(upstream_state_dict(seed), None)


def zoo_test_tinynet(pretrained: bool = False, **kwargs) -> TinyNet:
    return build_model(TinyNet, ARCH, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def register(cfgs: Dict[str, dict]) -> None:
    """(Re)register ``zoo_test_tinynet`` with ``{tag: zoo.hub.cfg(...)}``."""
    global default_cfgs
    default_cfgs = generate_default_cfgs({f"{ARCH}.{tag}": c for tag, c in cfgs.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overwriting zoo_test_tinynet in registry"
        register_model(zoo_test_tinynet)
