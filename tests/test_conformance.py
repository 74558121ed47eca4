"""timm conformance for every registered zoo model (the checks of timm's tests/test_models.py).

Parametrised at collection time from the registry, so a family is covered the moment it
registers. Inputs are kept small (the models accept any size); which checks apply to a
non-classifier is declared in conformance_subsets.py.
"""
import copy
import fnmatch
import math

import pytest
import timm
import torch

import zoo
from conformance_subsets import ALL_CHECKS, INPUT_SIZE, NO_GRAD_PARAMS, SUBSETS, TOO_LARGE
import _toy_models  # noqa: F401  (registers zoo_test_toynet)

MODELS = sorted(zoo.list_models()) + ["zoo_test_toynet"]
MAX_TEST_SIZE = 128


def _match(name, table):
    for pattern, value in table.items():
        if fnmatch.fnmatch(name, pattern):
            return value
    return None


def _checks(name):
    subset = _match(name, SUBSETS)
    return ALL_CHECKS if subset is None else frozenset(subset[0])


def _applies(check):
    """Models the check applies to: declared subsets and meta-only models are left out at
    collection time (not skipped), so every collected case really runs."""
    return [n for n in MODELS if _match(n, TOO_LARGE) is None and check in _checks(n)]


def _cfg(name):
    return timm.get_pretrained_cfg(name).to_dict()


def _reduction(model):
    return model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 32


def _test_size(name, model=None):
    override = _match(name, INPUT_SIZE)
    if override is not None:
        return tuple(override)
    cfg = _cfg(name)
    if cfg.get("fixed_input_size"):
        return tuple(cfg["input_size"][1:])
    red = _reduction(model) if model is not None else 32
    lo = tuple(cfg.get("min_input_size") or (3, 1, 1))[1:]
    size = []
    for full, least in zip(cfg["input_size"][1:], lo):
        s = min(full, max(MAX_TEST_SIZE, least))
        size.append(max(red, s // red * red))
    return tuple(size)


_CACHE = {}


def _model(name, **kwargs):
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        if len(_CACHE) > 4:
            _CACHE.clear()
        _CACHE[key] = timm.create_model(name, **kwargs).eval()
    return copy.deepcopy(_CACHE[key])


def _input(name, model, batch=1, size=None):
    cfg = _cfg(name)
    torch.manual_seed(1)
    return torch.randn(batch, cfg["input_size"][0], *(size or _test_size(name, model)))


@pytest.mark.parametrize("name", _applies("forward"))
def test_forward(name):
    model = _model(name)
    x = _input(name, model)
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == 1 and out.shape[-1] == model.num_classes
    assert not torch.isnan(out).any()
    if "grad_checkpointing" in _checks(name):
        model.set_grad_checkpointing(True)
        with torch.no_grad():
            out2 = model(x)
        torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", _applies("backward"))
def test_backward(name):
    model = _model(name, num_classes=42).train()
    x = _input(name, model, batch=2)
    out = model(x)
    assert out.shape[-1] == 42
    out.float().mean().backward()
    declared = _match(name, NO_GRAD_PARAMS)
    no_grad = declared[0] if declared else None
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    undeclared = [n for n in missing if no_grad is None or not fnmatch.fnmatch(n, no_grad)]
    assert not undeclared, f"parameters without grad: {undeclared[:10]}"
    if no_grad is not None:
        frozen = [n for n, p in model.named_parameters() if fnmatch.fnmatch(n, no_grad)]
        assert frozen and frozen == missing, f"declared no-grad parameters {no_grad!r} got gradients"
        assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert not any(torch.isnan(p.grad).any() for _, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("name", _applies("default_cfg"))
def test_default_cfg(name):
    """timm's default-cfg checks; token models (cfg pool_size None, NLC features) get timm's
    non-standard variant: channels last, unpooled output = the token sequence."""
    cfg = _cfg(name)
    model = _model(name)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    tokens = cfg.get("pool_size") is None
    size = _test_size(name, model)
    x = _input(name, model, size=size)
    if not tokens:
        red = _reduction(model)
        # cfg pool_size must agree with the model's final reduction at the cfg input size
        expected_pool = tuple(math.ceil(s / red) for s in cfg["input_size"][1:])
        assert tuple(cfg["pool_size"]) == expected_pool, (cfg["pool_size"], expected_pool)
    with torch.no_grad():
        feat = model.forward_features(x)
        if tokens:
            assert feat.ndim == 3 and feat.shape[-1] == model.num_features
        else:
            assert feat.shape[1] == model.num_features
            assert tuple(feat.shape[-2:]) == tuple(math.ceil(s / red) for s in size)
        pre = model.forward_head(feat, pre_logits=True)
        assert pre.shape[-1] == model.head_hidden_size
        model.reset_classifier(0)
        out = model(x)
        assert out.ndim == 2 and out.shape == pre.shape
        model.reset_classifier(0, "")
        out = model(x)
        unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()(x)
        for o in (out, unpooled):
            if tokens:
                assert o.ndim == 3 and o.shape[-1] == model.num_features
            else:
                assert o.ndim == 4 and o.shape[1] == model.num_features
    sd = timm.create_model(name).state_dict()
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else [cfg["classifier"]]
    for c in classifiers:
        assert c + ".weight" in sd, f"cfg classifier {c} not in state_dict"
    first = cfg["first_conv"] if isinstance(cfg["first_conv"], (tuple, list)) else [cfg["first_conv"]]
    for c in first:
        assert c + ".weight" in sd, f"cfg first_conv {c} not in state_dict"


@pytest.mark.parametrize("name", _applies("features_only"))
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    size = _test_size(name, model)
    x = _input(name, model, size=size)
    with torch.no_grad():
        feats = model(x)
    info = model.feature_info
    assert len(feats) >= 3 and len(feats) == len(info.channels())
    for f, c, r in zip(feats, info.channels(), info.reduction()):
        assert f.shape[1] == c
        assert f.shape[-2] <= math.ceil(size[0] / r) + 1 and f.shape[-1] <= math.ceil(size[1] / r) + 1


@pytest.mark.parametrize("name", _applies("forward_intermediates"))
def test_forward_intermediates(name):
    model = _model(name)
    size = _test_size(name, model)
    x = _input(name, model, size=size)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-5)
        only = model.forward_intermediates(x, intermediates_only=True)
    info = model.feature_info
    assert len(inters) == len(info) == len(only)
    for f, g, i in zip(inters, only, info):
        assert f.shape[1] == i["num_chs"]
        assert f.shape[-2] <= math.ceil(size[0] / i["reduction"]) + 1
        torch.testing.assert_close(f, g)
    getter = timm.create_model(name, features_only=True, feature_cls="getter").eval()
    with torch.no_grad():
        assert len(getter(x)) == len(getter.feature_info.channels())


@pytest.mark.parametrize("name", _applies("fx"))
def test_fx(name):
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = _model(name)
    x = _input(name, model)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                         tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        ref = model(x)
        out = fx_model(x)
    out = out[eval_nodes[-1]]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", sorted(TOO_LARGE) or ["<none>"])
def test_too_large_meta_param_count(pattern):
    if pattern == "<none>":
        return
    expected, rtol, _ = TOO_LARGE[pattern]
    names = [n for n in MODELS if fnmatch.fnmatch(n, pattern)]
    assert names, f"TOO_LARGE pattern {pattern} matches no model"
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - expected) <= rtol * expected, (name, count, expected)


@pytest.mark.parametrize("pattern", sorted(NO_GRAD_PARAMS))
def test_no_grad_declarations_match_models(pattern):
    assert [n for n in MODELS if fnmatch.fnmatch(n, pattern)], f"NO_GRAD_PARAMS pattern {pattern} matches no model"


def test_every_model_in_suite():
    assert "zoo_test_toynet" in MODELS
    assert set(zoo.list_models()) <= set(MODELS)
