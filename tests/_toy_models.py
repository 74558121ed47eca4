"""A tiny timm-style CNN registered only by the tests: exercises the conformance suite before any
family lands and keeps it honest afterwards (it must pass every check)."""
import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

import zoo.hub
from zoo.models._builder import build_model


class ToyNet(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3, global_pool="avg", drop_rate=0.0, widths=(8, 16, 24), **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 2, 1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, prev, self.feature_info = [], widths[0], []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(nn.Conv2d(prev, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU()))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** (i + 2), module=f"stages.{i}"))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head.fc

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW", intermediates_only=False):
        take, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        intermediates = []
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x):
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "zoo_test_toynet.untrained": zoo.hub.cfg(
        input_size=(3, 64, 64), pool_size=(4, 4), first_conv="stem.0", classifier="head.fc", license="apache-2.0"),
})


@register_model
def zoo_test_toynet(pretrained=False, **kwargs):
    feature_cfg = dict(flatten_sequential=True, out_indices=(0, 1, 2), **(kwargs.pop("feature_cfg", None) or {}))
    return build_model(ToyNet, "zoo_test_toynet", pretrained, feature_cfg=feature_cfg, **kwargs)
