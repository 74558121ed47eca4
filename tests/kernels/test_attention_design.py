"""The op's design contract: API.md lists exactly `__all__`, one router with documented order and
clear errors, the op as one torch.fx leaf, attention dropout on every backend, and the package
importing without timm, mmengine or any model."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo.kernels as zk
from zoo.kernels import op
from zoo.kernels import triton as ta
from zoo.kernels.custom_op import force_custom_op
from zoo.kernels.reference import core

API = Path(zk.__file__).with_name("API.md")


def test_api_md_lists_exactly_all():
    code = re.sub(r"#[^\n]*", "", re.search(r"```python\n(.*?)```", API.read_text(), re.S).group(1))
    block = re.search(r"from zoo\.kernels import \((.*?)\)", code, re.S).group(1)
    listed = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", block))
    assert listed == set(zk.__all__)
    for name in zk.__all__:
        assert hasattr(zk, name), name


def test_import_loads_no_timm_mmengine_or_models():
    """kernels/ loaded on its own (as a bare package, without `zoo`, which registers the models)
    imports neither timm, mmengine nor a model."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_zk_probe', sys.argv[1], "
            "submodule_search_locations=[sys.argv[2]]); m = importlib.util.module_from_spec(spec); "
            "sys.modules['_zk_probe'] = m; spec.loader.exec_module(m); assert m.attention; "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('timm', 'mmengine', 'zoo')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(API.with_name("__init__.py")), str(API.parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_router_order_and_fallback():
    q = torch.randn(1, 2, 20, 8)
    impl, lay = op.route(q, q, q, None, [], 0.0, None)
    assert impl.__name__.endswith("reference.core")
    kl = zk.key_lists(torch.rand(1, 2, 20, 20).topk(4, -1).indices, 20)
    impl, lay = op.route(q, q, q, kl, [], 0.0, None)
    assert impl.__name__.endswith("reference.key_lists") and lay is kl
    impl, lay = op.route(q, q, q, kl, [zk.TalkingHeads(torch.eye(2))], 0.0, None)    # lists -> their mask
    assert impl.__name__.endswith("reference.core") and isinstance(lay, zk.MaskLayout)
    impl, lay = op.route(q, q, q, kl, [], 0.1, "reference")                          # no dropout on lists
    assert impl.__name__.endswith("reference.core") and isinstance(lay, zk.MaskLayout)


def test_forced_backend_error_names_the_reason():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"backend='flex' cannot run this call: .*needs CUDA"):
        zk.attention(q, q, q, backend="flex")
    if ta.interpreter_enabled():
        with pytest.raises(ValueError, match=r"backend='triton' cannot run.*no attention dropout"):
            zk.attention(q, q, q, backend="triton", dropout_p=0.1)
        with pytest.raises(ValueError, match="float64"):
            zk.attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        zk.attention(q, q, q, dropout_p=1.0)


def test_op_is_one_fx_leaf():
    class M(torch.nn.Module):
        layout = zk.causal(9)

        def forward(self, x):
            q = x.unflatten(-1, (2, 4)).transpose(1, 2)
            return zk.attention(q, q, q, self.layout, scale=0.5).transpose(1, 2).flatten(2)

    x = torch.randn(2, 9, 8)
    gm = torch.fx.symbolic_trace(M())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is zk.attention]
    assert len(calls) == 1
    torch.testing.assert_close(gm(x), M()(x))


# -- dropout ------------------------------------------------------------------------------------------
def _probs_via_identity_v(p, layout=None, seed=0, **kw):
    """With v = identity (Lk = Dv) the output rows are the dropped-out probabilities."""
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 24, 8, dtype=torch.float64), torch.randn(2, 3, 24, 8, dtype=torch.float64)
    v = torch.eye(24, dtype=torch.float64).expand(2, 3, 24, 24)
    torch.manual_seed(seed)
    out = zk.attention(q, k, v, layout, dropout_p=p, **kw)
    return out, zk.attention(q, k, v, layout)


@pytest.mark.parametrize("layout", [None, zk.causal(24), zk.window_2d(4, 6, 2, 1),
                                    zk.key_lists(torch.rand(1, 1, 24, 24).topk(6, -1).indices, 24)],
                         ids=["dense", "causal", "window", "key_lists"])
def test_dropout_zeroes_probabilities_and_rescales_the_rest(layout):
    out, ref = _probs_via_identity_v(0.3, layout)
    kept = ref > 0
    dropped = kept & (out == 0)
    frac = dropped.sum() / kept.sum()
    assert 0.22 < float(frac) < 0.38                              # ~ p of the admissible entries
    torch.testing.assert_close(out[kept & ~dropped], ref[kept & ~dropped] / 0.7)
    assert torch.all(out[~kept] == 0)


def test_dropout_is_seeded_and_unbiased():
    a, ref = _probs_via_identity_v(0.5, seed=3)
    b, _ = _probs_via_identity_v(0.5, seed=3)
    c, _ = _probs_via_identity_v(0.5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean = sum(_probs_via_identity_v(0.5, seed=s)[0] for s in range(200)) / 200
    assert float((mean - ref).abs().max()) < 0.15 and float((mean - ref).abs().mean()) < 0.02
    torch.manual_seed(0)
    q = torch.randn(1, 2, 10, 4)
    torch.testing.assert_close(zk.attention(q, q, q, dropout_p=0.0), F.scaled_dot_product_attention(q, q, q))


def test_dropout_gradients_chunked_recompute_and_custom_op(monkeypatch):
    torch.manual_seed(0)
    lay = zk.window_2d(4, 8, 2, 1)
    q, k, v = (torch.randn(1, 2, 32, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 32, 32, dtype=torch.float64, requires_grad=True)

    def f(*ts):
        torch.manual_seed(7)                                      # the same mask on every call
        return zk.attention(*ts[:3], lay, bias=ts[3], dropout_p=0.2)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-6, fast_mode=True)
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 64)               # several chunks ...
    o1 = f(q, k, v, bias)
    g1 = torch.autograd.grad(o1.sum(), (q, k, v, bias))
    monkeypatch.setattr(core, "RECOMPUTE_ABOVE", 0)               # ... recomputed in backward
    o2 = f(q, k, v, bias)
    g2 = torch.autograd.grad(o2.sum(), (q, k, v, bias))
    with force_custom_op(True):                                    # and through zoo::attention_ref
        o3 = f(q, k, v, bias)
        g3 = torch.autograd.grad(o3.sum(), (q, k, v, bias))
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(o1, o3)


def test_dropout_with_talking_heads():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    v = torch.eye(12, dtype=torch.float64).expand(1, 2, 12, 12)
    th = zk.TalkingHeads(torch.randn(2, 2, dtype=torch.float64), torch.rand(2, 2, dtype=torch.float64))
    ref = zk.attention(q, q, v, head_mix=th)
    out = zk.attention(q, q, v, head_mix=th, dropout_p=0.25)
    dropped = (out == 0) & (ref != 0)
    torch.testing.assert_close(out[~dropped], ref[~dropped] / 0.75)
    assert 0 < int(dropped.sum()) < ref.numel()
