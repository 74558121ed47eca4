"""timm's generic calls, torch.compile, torch.export and TorchScript on every registered zoo model.

Users loop over ``zoo.list_models()`` with timm's tools; every model must either do what a call
asks or raise ``zoo.errors.UnsupportedError`` (the documented error, which names the supported
alternative). Anything else -- a raw AttributeError / KeyError / IndexError, a silent ImageNet
default, a compiled graph that breaks or disagrees with eager -- fails here.

Models running the full classifier suite (no entry in conformance_subsets.SUBSETS) must succeed
at every call; the other families may answer a call with UnsupportedError. Models in
conformance_subsets.TOO_LARGE are built on the meta device and run only the calls that execute no
forward (data config, TorchScript).
TorchScript is a per-family decision: scripted output equal to eager, or UnsupportedError naming
torch.compile and torch.export.

CPU cost: every model runs the eager calls (forward, features_only, forward_intermediates,
reset_classifier, data config, TorchScript). The traced calls -- backward, compile and export --
run on one small variant per family (``REPRESENTATIVES``; Inductor for the classifiers, one block
per stage: eval and train forward and gradients; ``backend="eager"`` with ``fullgraph=True`` for
the others), since
the variants of a family share their code and a Dynamo trace of every variant costs about 40
minutes on 2 CPU cores. ``ZOO_TEST_ALL_VARIANTS=1`` runs the traced calls on every model.
"""
import copy
import fnmatch
import inspect
import os

import pytest
import timm
import torch
import torch._dynamo
from timm.data import create_transform, resolve_data_config
from torch.utils._pytree import tree_leaves

import zoo
from conformance_subsets import INPUT_SIZE, SUBSETS, TOO_LARGE
from zoo.errors import UnsupportedError

MODELS = sorted(zoo.list_models())
CALLS = ("forward", "backward", "features_only", "forward_intermediates", "reset_classifier", "data_config",
         "compile", "export", "torchscript")
# one small variant per classifier family gets Inductor; the rest the eager backend (same fullgraph capture)
INDUCTOR = {"biformer_tiny", "ffnet_1", "halonet26t_zoo", "sparsifiner_deit_tiny_patch16_224", "pyramid_tnt_ti",
            "gmm_vit_tiny_p4_32"}
# ... at reduced depth: every block type and stage kept, one block each (Inductor's CPU compile time
# grows with the number of blocks; their code is shared)
INDUCTOR_KW = {"biformer_tiny": dict(depths=(1, 1, 1, 1)), "ffnet_1": dict(depths=(1, 1, 1, 1)),
               "pyramid_tnt_ti": dict(depths=(1, 1, 1, 1)), "sparsifiner_deit_tiny_patch16_224": dict(depth=2),
               "gmm_vit_tiny_p4_32": dict(depth=2)}
# Inductor's C++ wrapper: the same kernels, built as one shared library per graph instead of one
# per kernel, which halves the CPU compile time (g++ start-up dominates it)
INDUCTOR_OPTIONS = {"cpp_wrapper": True}
# one small variant per family runs the traced calls (backward, compile, export)
REPRESENTATIVES = INDUCTOR | {"focus_detr_tiny", "agunet_3d_small", "partcrafter_dit_tiny", "puppeteer_skin_small",
                              "puppeteer_skeleton_small"}
TRACED = ("backward", "compile", "export")
# models built on the meta device run only the calls that execute no forward (their small siblings
# run the rest: the same code at another width and depth)
META_CALLS = ("data_config", "torchscript")
ALL_VARIANTS = os.environ.get("ZOO_TEST_ALL_VARIANTS", "") not in ("", "0")
MAX_SIZE = 64           # spatial test size cap (the models accept any size from their minimum up)
# smaller example inputs for non-image models (keyword names of their example_inputs)
SMALL_EXAMPLE_KW = {"num_points": 256, "tokens_per_part": 64, "context_tokens": 16, "shape_tokens": 17,
                    "num_joints": 8}


def _match(name, table):
    for pattern, value in table.items():
        if fnmatch.fnmatch(name, pattern):
            return value
    return None


def _meta(name):
    return _match(name, TOO_LARGE) is not None


def _full_suite(name):
    """Image classifiers (no declared subset): every generic call must succeed."""
    return _match(name, SUBSETS) is None


_CACHE = {}


def _create(name, **kwargs):
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE.clear()
        torch.manual_seed(0)
        if _meta(name):
            with torch.device("meta"):
                _CACHE[key] = timm.create_model(name, **kwargs).eval()
        else:
            _CACHE[key] = timm.create_model(name, **kwargs).eval()
    return copy.deepcopy(_CACHE[key])


def _takes_example_inputs(model):
    return callable(getattr(model, "example_inputs", None))


def _image_size(name, model):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    full = tuple(cfg["input_size"][1:])
    override = _match(name, INPUT_SIZE)
    if override is not None:
        return tuple(override)
    if cfg.get("fixed_input_size"):
        return full
    info = getattr(model, "feature_info", None)
    red = info[-1]["reduction"] if isinstance(info, list) and info else 1
    least = tuple(cfg.get("min_input_size") or (0,) * (len(full) + 1))[1:]
    return tuple(max(lo, min(s, max(MAX_SIZE, red) // red * red)) for s, lo in zip(full, least))


def _inputs(name, model, batch=1):
    """(args, kwargs) of one forward call: the model's example_inputs, or an image / volume tensor."""
    device = "meta" if _meta(name) else "cpu"
    if _takes_example_inputs(model):
        params = inspect.signature(model.example_inputs).parameters
        kw = {k: v for k, v in SMALL_EXAMPLE_KW.items() if k in params}
        torch.manual_seed(1)
        return (), model.example_inputs(batch_size=batch, device=device, dtype=torch.float32, **kw)
    cfg = timm.get_pretrained_cfg(name).to_dict()
    torch.manual_seed(1)
    return (torch.randn(batch, cfg["input_size"][0], *_image_size(name, model), device=device),), {}


def _tensors(out):
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _close(out, ref, what):
    """fp32 outputs equal to 1e-4 of each output's largest magnitude."""
    got, want = _tensors(out), _tensors(ref)
    assert len(got) == len(want) and got, f"{what}: {len(got)} output tensors, eager gave {len(want)}"
    for g, w in zip(got, want):
        assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != eager {tuple(w.shape)}"
        if w.device.type == "meta" or not w.is_floating_point():
            continue
        tol = 1e-4 * max(w.abs().max().item(), 1e-6)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=tol, msg=lambda m: f"{what}: {m}")


def _loss(out):
    return sum(t.float().mean() for t in _tensors(out) if t.is_floating_point() and t.requires_grad)


def _check_forward(name):
    model = _create(name)
    args, kwargs = _inputs(name, model)
    with torch.no_grad():
        out = model(*args, **kwargs)
    outs = _tensors(out)
    assert outs, "forward returned no tensor"
    if not _meta(name):
        assert all(torch.isfinite(t).all() for t in outs if t.is_floating_point())


def _check_backward(name):
    model = _create(name).train()
    args, kwargs = _inputs(name, model, batch=2)
    loss = _loss(model(*args, **kwargs))
    assert isinstance(loss, torch.Tensor), "no differentiable output"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "backward reached no parameter"
    if not _meta(name):
        assert all(torch.isfinite(g).all() for g in grads)


def _check_features_only(name):
    model = _create(name, features_only=True)
    args, kwargs = _inputs(name, model)
    with torch.no_grad():
        feats = model(*args, **kwargs)
    info = model.feature_info
    assert len(feats) == len(info.channels()) >= 1
    for f, c in zip(feats, info.channels()):
        assert f.shape[1] == c, (tuple(f.shape), c)


def _check_forward_intermediates(name):
    model = _create(name)
    args, kwargs = _inputs(name, model)
    with torch.no_grad():
        final, inters = model.forward_intermediates(*args, **kwargs)
        only = model.forward_intermediates(*args, intermediates_only=True, **kwargs)
    assert _tensors(final) and len(inters) == len(only) >= 1


def _check_reset_classifier(name):
    model = _create(name)
    args, kwargs = _inputs(name, model)
    model.reset_classifier(7)
    assert model.num_classes == 7
    with torch.no_grad():
        out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor) and out.ndim == 2:      # a classifier: logits for the new classes
        assert out.shape[-1] == 7
    model.reset_classifier(0)
    with torch.no_grad():
        feats = model(*args, **kwargs)
    if isinstance(feats, torch.Tensor) and feats.ndim == 2:  # pooled features, no head
        assert feats.shape[-1] == model.num_features


def _check_data_config(name):
    model = _create(name)
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)
    if len(cfg["input_size"]) == 3 and cfg["input_size"][0] == 3:    # an RGB image pipeline: run it
        from PIL import Image
        h, w = cfg["input_size"][1:]
        out = transform(Image.new("RGB", (w + 13, h + 7), (90, 120, 200)))
        assert tuple(out.shape) == tuple(cfg["input_size"])


def _check_compile(name):
    torch._dynamo.reset()
    backend = "inductor" if name in INDUCTOR else "eager"
    model = _create(name, **INDUCTOR_KW.get(name, {}))
    args, kwargs = _inputs(name, model, batch=2)
    options = INDUCTOR_OPTIONS if backend == "inductor" else None
    compiled = torch.compile(model, fullgraph=True, backend=backend, options=options)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
        ref = model(*args, **kwargs)
    _close(out, ref, f"{backend} eval")
    if backend != "inductor":
        return
    model.train()
    ref = model(*args, **kwargs)
    _loss(ref).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = compiled(*args, **kwargs)
    _close(out, ref, f"{backend} train")
    _loss(out).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    # gradients: 1e-4 of the largest gradient anywhere (a tensor whose gradients are all tiny, e.g.
    # the stem under a mean loss, only carries fp32 reassociation noise at that scale)
    scale = max(g.abs().max().item() for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m, n=n: f"{backend} grad {n}: {m}")


def _check_export(name):
    model = _create(name)
    args, kwargs = _inputs(name, model, batch=2)
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs)
        out = program.module()(*args, **kwargs)
        ref = model(*args, **kwargs)
    _close(out, ref, "exported program")


def _check_torchscript(name):
    model = _create(name)
    scripted = torch.jit.script(model)
    args, kwargs = _inputs(name, model)
    with torch.no_grad():
        _close(scripted(*args, **kwargs), model(*args, **kwargs), "scripted model")


def _is_image_model(name):
    """Takes an image (or volume) tensor: its cfg has an input_size (non-image cfgs describe their
    inputs in notes and build them with example_inputs)."""
    return "input_size" in timm.get_pretrained_cfg(name).to_dict()


_CHECKS = {c: globals()[f"_check_{c}"] for c in CALLS}
_MUST_WORK = ("forward", "backward")      # a model's own forward / backward on its own inputs


def _cases():
    for n in MODELS:
        for c in CALLS:
            if c == "export" and not _is_image_model(n):
                continue
            if c in TRACED and not (ALL_VARIANTS or n in REPRESENTATIVES):
                continue
            if _meta(n) and c not in META_CALLS:
                continue
            yield n, c


@pytest.mark.parametrize("name,call", list(_cases()))
def test_generic_call(name, call):
    """Success, or UnsupportedError with a message where the model is not a full classifier
    (TorchScript: every family decides, see its card)."""
    try:
        _CHECKS[call](name)
    except UnsupportedError as e:
        if call in _MUST_WORK or (_full_suite(name) and call != "torchscript"):
            raise AssertionError(f"{name}: {call} must work for this model, got UnsupportedError: {e}") from e
        assert len(str(e)) > 20, f"UnsupportedError without an explanation: {e!r}"
        if call == "torchscript":
            assert "torch.compile" in str(e) and "torch.export" in str(e), str(e)


def test_every_classifier_family_has_an_inductor_variant():
    for family in zoo.list_families():
        classifiers = [n for n in zoo.list_models(family=family) if _full_suite(n) and not _meta(n)]
        if classifiers:
            assert INDUCTOR & set(classifiers), f"no Inductor variant for {family} (one of {classifiers[:3]})"
    assert INDUCTOR <= set(MODELS), sorted(INDUCTOR - set(MODELS))
    assert set(INDUCTOR_KW) <= INDUCTOR, sorted(set(INDUCTOR_KW) - INDUCTOR)


def test_every_family_has_a_representative():
    for family in zoo.list_families():
        assert REPRESENTATIVES & set(zoo.list_models(family=family)), f"no representative for {family}"
    assert REPRESENTATIVES <= set(MODELS), sorted(REPRESENTATIVES - set(MODELS))
