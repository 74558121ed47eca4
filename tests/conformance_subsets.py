"""The one place where zoo models declare which timm conformance checks apply to them, and why.

Every registered zoo model runs the full classifier suite unless it matches a pattern here.
Patterns are fnmatch wildcards over model names.
"""

ALL_CHECKS = frozenset({"forward", "grad_checkpointing", "backward", "default_cfg", "features_only",
                        "forward_intermediates", "fx"})

# name pattern -> (checks that apply, reason)
SUBSETS = {
}

# Built only on the meta device (parameter count checked against the expected value): too large
# for the 2-core CI. name pattern -> (expected params in millions, relative tolerance, reason)
TOO_LARGE = {
}

# Extra per-model test input size (H, W) where the generic small size does not fit the model.
INPUT_SIZE = {
}
