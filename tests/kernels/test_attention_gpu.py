"""Compiled-mode checks of the Triton kernels on a CUDA device (skipped without one; run by
.ci/gpu_check.sh with TRITON_INTERPRET=0): every interpreter case in fp32/fp16/bf16, head dims
16-256 incl. non powers of two, the compiled-Flex backend and torch.compile (inductor)."""
import pytest
import torch

import zoo.kernels as zk
from zoo.kernels import triton as ta
from zoo.kernels.reference import dense_oracle

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ta.HAS_TRITON and not ta.interpreter_enabled()),
                                reason="needs a CUDA device and compiled Triton (TRITON_INTERPRET=0)")

from _triton_aot import HEAD_DIM_LAYOUTS, HEAD_DIMS, head_dim_inputs, keylist_gather_inputs  # noqa: E402
from test_attention_triton import CASES, _check  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_cases(name, dtype):
    _check(name, dtype, device="cuda")


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("layout", HEAD_DIM_LAYOUTS)
def test_gpu_head_dims(d, layout, monkeypatch):
    from zoo.kernels.triton import key_lists as keylist_triton
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0)     # key lists: the gather kernel
    lay, q, k, v = head_dim_inputs(d, layout, "cuda")
    o = zk.attention(q, k, v, lay)
    o2, _ = dense_oracle(q.double(), k.double(), v.double(), lay)
    torch.testing.assert_close(o.double(), o2, atol=1e-2, rtol=1e-2)
    g = torch.autograd.grad(o.float().square().sum(), (q, k, v))
    g2 = torch.autograd.grad(o2.square().sum(), (q, k, v))
    for a, b in zip(g, g2):
        torch.testing.assert_close(a.double(), b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["window_zero_relpos", "routed_duplicates_kvvalid_perhead", "segments_ragged_empty_rows",
                                  "causal_prefix_kvcache_indexed", "dense_gmm_mul_prefix"])
def test_gpu_flex_backend_matches_reference(name):
    Lq, Lk, mk_lay, mk_bias, mk_sm = CASES[name]
    from test_attention_triton import _to
    lay = _to(mk_lay(), "cuda")
    bias = _to(mk_bias(torch.float32), "cuda") if mk_bias else None
    sm = _to(mk_sm(torch.float32), "cuda") if mk_sm else None
    q, k, v = (torch.randn(1, 2, L, 16, device="cuda") for L in (Lq, Lk, Lk))
    o, l = zk.attention(q, k, v, lay, bias=bias, score_mod=sm, backend="flex", return_lse=True)
    o2, l2 = zk.attention(q, k, v, lay, bias=bias, score_mod=sm, backend="reference", return_lse=True)
    torch.testing.assert_close(o, o2, atol=2e-3, rtol=2e-3)


def test_gpu_torch_compile_inductor_fullgraph():
    dev = "cuda"
    lay = zk.window_2d(16, 16, 8, 2)
    q, k, v = (torch.randn(2, 4, 256, 32, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    rh = torch.randn(2, 4, 256, 23, device=dev, dtype=torch.float16, requires_grad=True)

    def f(q, k, v, rh):
        return zk.attention(q, k, v, lay, bias=zk.RelPosBias(rh, rh))

    cf = torch.compile(f, fullgraph=True)
    oc, oe = cf(q, k, v, rh), f(q, k, v, rh)
    torch.testing.assert_close(oc, oe, atol=2e-3, rtol=2e-3)
    gc = torch.autograd.grad(oc.float().sum(), (q, k, v, rh))
    ge = torch.autograd.grad(oe.float().sum(), (q, k, v, rh))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("gather", [True, False])
def test_gpu_torch_compile_key_lists_fullgraph(gather, monkeypatch):
    """Key lists compile without graph breaks on both Triton paths (gather kernel, element mask)."""
    from zoo.kernels.triton import key_lists as keylist_triton
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0 if gather else 0.0)
    dev = "cuda"
    L = 197
    idx = torch.rand(2, 4, L, L, device=dev).topk(50, -1).indices
    q, k, v = (torch.randn(2, 4, L, 64, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return zk.attention(q, k, v, zk.key_lists(idx, L, dense_rows=1, validate=False))

    cf = torch.compile(f, fullgraph=True)
    oc, oe = cf(q, k, v), f(q, k, v)
    torch.testing.assert_close(oc, oe, atol=2e-3, rtol=2e-3)
    gc = torch.autograd.grad(oc.float().sum(), (q, k, v))
    ge = torch.autograd.grad(oe.float().sum(), (q, k, v))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_key_lists_gather_kernel(dtype, monkeypatch):
    """The gather kernel compiled: unused slots, an empty row, dense rows, lse and its gradient."""
    from zoo.kernels.triton import key_lists as keylist_triton
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0)
    lay, q, k, v = keylist_gather_inputs(dtype, "cuda")
    o, l = zk.attention(q, k, v, lay, return_lse=True)
    fin = torch.isfinite(l)
    assert not fin.all() and torch.all(o[~fin[..., None].expand_as(o)] == 0)
    go, gl = torch.randn_like(o), torch.randn_like(l)
    g = torch.autograd.grad((o * go).float().sum() + (torch.where(fin, l, 0) * gl).sum(), (q, k, v))
    dl = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    o2, l2 = dense_oracle(*dl, lay)
    g2 = torch.autograd.grad((o2 * go.double()).sum() + (torch.where(fin, l2, 0) * gl.double()).sum(), dl)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(o.double(), o2, atol=tol, rtol=tol)
    torch.testing.assert_close(l[fin].double(), l2[fin], atol=tol, rtol=tol)
    for a, b in zip(g, g2):
        s = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / s, b / s, atol=tol, rtol=tol)
