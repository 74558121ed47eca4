"""The one place where zoo models declare which timm conformance checks apply to them, and why.

Every registered zoo model runs the full classifier suite unless it matches a pattern here.
Patterns are fnmatch wildcards over model names.
"""

ALL_CHECKS = frozenset({"forward", "grad_checkpointing", "backward", "default_cfg", "features_only",
                        "forward_intermediates", "fx"})

# name pattern -> (checks that apply, reason)
SUBSETS = {
    # Detectors: forward(images) returns a dict of class logits and boxes, not a (B, classes)
    # tensor; tests/models/test_focus_detr.py covers forward, backward and the losses instead.
    "focus_detr_*": ((), "detector (dict output); own tests cover forward/backward"),
    # Puppeteer: points / skeleton tokens in, skin weights / token logits out; no image input,
    # pooling, classifier head or feature maps. tests/models/test_puppeteer.py covers the rest.
    "puppeteer_*": ((), "not an image classifier (points and skeleton tokens)"),
    # 3-D segmenters: (B, 1, D1, D2, D3) in, per-voxel logits out; no pooled head, feature pyramid
    # or fx trace (pooling depends on the volume size). tests/models/test_agunet.py covers
    # forward, backward, grad checkpointing and forward_intermediates.
    "agunet_3d*": ((), "3-D segmenter"),
    "daunet_3d*": ((), "3-D segmenter"),
    "dagunet_3d*": ((), "3-D segmenter"),
    # PartCrafter: a part-wise latent DiT (velocity output for packed part tokens), not an image
    # model; tests/models/test_partcrafter.py covers forward, backward and the layouts.
    "partcrafter_dit*": ((), "latent DiT blocks, not an image classifier"),
}

# Parameters that get no gradient from the task loss, by design. name pattern -> (parameter-name
# pattern, reason). test_backward checks that exactly these parameters are left without a gradient
# (and are frozen); timm's own test_model_backward, which wants a gradient on every parameter, fails
# for these models for this reason.
NO_GRAD_PARAMS = {
    # Sparsifiner's connectivity predictors learn only from the attention-distillation loss
    # (attn_mode='recon', see zoo.recipes.sparsifiner), as upstream; the default sparse mode
    # freezes them and trains the backbone.
    "sparsifiner_*": ("*.mask_predictor.*", "connectivity predictors train on the distillation loss only"),
}

# Built only on the meta device (parameter count checked against the expected value): too large
# for the 2-core CI. name pattern -> (expected params in millions, relative tolerance, reason)
TOO_LARGE = {
    "focus_detr_swin_base_384": (109.9, 0.02, "110 M-parameter detector"),
    "pyramid_tnt_b": (157.0, 0.01, "157 M parameters"),
    "partcrafter_dit": (1439.621696, 0.001, "1.44 B-parameter PartCrafter DiT"),
    "puppeteer_skeleton_opt350m": (304.81, 0.01, "OPT-350m decoder"),
    "puppeteer_skin_d2": (87.66, 0.01, "not an image model; size checked here"),
    "puppeteer_skin_d1": (44.34, 0.01, "not an image model; size checked here"),
}

# Extra per-model test input size (H, W) where the generic small size does not fit the model.
INPUT_SIZE = {
}
