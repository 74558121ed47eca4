"""Reference backend of zoo.kernels.attention against the naive dense oracle, plus fp64 gradcheck
and input validation."""
import pytest
import torch
import torch.nn.functional as F

import zoo.kernels as zk
from _modifiers import modifier_leaves, rebuild_modifiers
from zoo.kernels.layouts import routed
from zoo.kernels.reference import core as ref
from zoo.kernels.reference import dense_oracle

DT = torch.float64


def _rand(*shape, dtype=DT, **kw):
    return torch.randn(*shape, dtype=dtype, **kw)


def _relpos(B, H, Lq, lay):
    return zk.RelPosBias(_rand(B, H, Lq, 2 * lay.win_h - 1), _rand(B, H, Lq, 2 * lay.win_w - 1))


def _key_lists(B, H, Lq, Lk, K, seed=0):
    """Distinct random keys per row; a few unused (-1) slots and one row with no key at all."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, H, Lq, Lk, generator=g).topk(K, -1).indices
    idx[..., 3, :2] = -1
    idx[0, 0, 5, :] = -1
    return idx


def _cases():
    """(name, Lq, Lk, layout factory(B), bias factory(B, H, Lq, Lk, layout), score_mod factory(H))."""
    B = 2
    cases = []
    for border in ("zero", "clamp"):
        cases += [
            (f"window_{border}", 64, 64, lambda b=border: zk.window_2d(8, 8, 4, 1, border=b), None, None),
            (f"window_{border}_relpos", 64, 64, lambda b=border: zk.window_2d(8, 8, 4, 2, border=b),
             lambda B, H, Lq, Lk, lay: _relpos(B, H, Lq, lay), None),
            (f"window_{border}_stride2_relpos", 16, 64, lambda b=border: zk.window_2d(8, 8, 4, 1, border=b, stride=2),
             lambda B, H, Lq, Lk, lay: _relpos(B, H, Lq, lay), None),
            (f"window_{border}_kvvalid_dense", 64, 64,
             lambda b=border: zk.window_2d(8, 8, 4, 2, border=b, kv_valid=torch.rand(B, 64) > 0.3),
             lambda B, H, Lq, Lk, lay: _rand(B, 1, Lq, Lk), None),
            (f"window_{border}_indexed", 48, 48, lambda b=border: zk.window_2d(6, 8, 2, 1, border=b),
             lambda B, H, Lq, Lk, lay: zk.IndexedBias(_rand(H, 5), torch.randint(0, 5, (B, Lq, Lk))), None),
        ]
    ti = torch.stack([torch.randperm(16)[:3] for _ in range(B * 16)]).view(B, 16, 3)
    ti[0, 0, 1] = ti[0, 0, 0]      # duplicate entry: attended once
    cases += [
        ("routed", 64, 64, lambda: zk.routed_topk(ti, 4), None, None),
        ("routed_perhead_kvvalid_indexed", 64, 64,
         lambda: zk.routed_topk(torch.randint(0, 16, (B, 2, 16, 2)), 4, kv_valid=torch.rand(B, 64) > 0.4),
         lambda B, H, Lq, Lk, lay: zk.IndexedBias(_rand(H, 7), torch.randint(0, 7, (1, Lq, Lk))), None),
        ("routed_dense_bias", 64, 64, lambda: zk.routed_topk(ti, 4), lambda B, H, Lq, Lk, lay: _rand(H, Lq, Lk), None),
        ("segments", 40, 40, lambda: zk.segments(torch.randint(-1, 4, (B, 40))), None, None),
        ("segments_cross_bias", 40, 30,
         lambda: zk.segments(torch.randint(-1, 4, (B, 40)), torch.randint(-1, 5, (B, 30))),
         lambda B, H, Lq, Lk, lay: _rand(B, H, Lq, Lk), None),
        ("causal", 40, 40, lambda: zk.causal(40), None, None),
        ("causal_prefix_kvcache", 10, 40, lambda: zk.causal(10, 40, prefix=33, kv_valid=torch.rand(B, 40) > 0.2),
         lambda B, H, Lq, Lk, lay: zk.IndexedBias(_rand(H, 3), torch.randint(0, 3, (B, Lq, Lk))), None),
        ("dense_mask", 40, 36, lambda: zk.from_dense_mask(torch.rand(B, 2, 40, 36) > 0.8), None, None),
        ("key_lists_dense_rows_padded", 40, 36, lambda: zk.key_lists(_key_lists(B, 2, 40, 36, 6), 36, dense_rows=2),
         None, None),
        ("key_lists_broadcast_bias", 40, 36, lambda: zk.key_lists(_key_lists(1, 2, 40, 36, 5), 36),
         lambda B, H, Lq, Lk, lay: _rand(B, 1, Lq, Lk), None),
        ("dense_relpos", 42, 42, lambda: None,
         lambda B, H, Lq, Lk, lay: zk.RelPosBias(_rand(B, H, Lq, 11), _rand(B, H, Lq, 13), (6, 7), (6, 7)), None),
        ("dense_gmm_mul", 50, 50, lambda: None, None,
         lambda H: zk.GaussianMixture(_rand(H, 3), torch.rand(H, 3, dtype=DT) + 0.5, (7, 7), num_prefix_tokens=1)),
        ("causal_gmm_add_bias", 49, 49, lambda: zk.causal(49),
         lambda B, H, Lq, Lk, lay: _rand(1, H, 1, Lk),
         lambda H: zk.GaussianMixture(_rand(H, 2), torch.rand(H, 2, dtype=DT) + 0.5, (7, 7), mode="add")),
    ]
    return cases


CASES = _cases()


def _run_case(case, B=2, H=2, D=8, Dv=6, seed=0):
    torch.manual_seed(seed)
    name, Lq, Lk, mk_lay, mk_bias, mk_sm = case
    lay = mk_lay()
    q, k, v = _rand(B, H, Lq, D), _rand(B, H, Lk, D), _rand(B, H, Lk, Dv)
    bias = mk_bias(B, H, Lq, Lk, lay) if mk_bias else None
    sm = mk_sm(H) if mk_sm else None
    return lay, q, k, v, bias, sm


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_dense_oracle_fwd_bwd(case):
    lay, q, k, v, bias, sm = _run_case(case)
    leaves = [q, k, v] + modifier_leaves(bias, sm)
    for t in leaves:
        t.requires_grad_(True)
    scale = 0.37
    o1, l1 = zk.attention(q, k, v, lay, scale=scale, bias=bias, score_mod=sm, return_lse=True, backend="reference")
    o2, l2 = dense_oracle(q, k, v, lay, scale=scale, bias=bias, score_mod=sm)
    fin = torch.isfinite(l2)
    assert torch.equal(torch.isfinite(l1), fin)
    assert torch.all(l1[~fin] == float("-inf"))
    torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(l1[fin], l2[fin], atol=1e-10, rtol=1e-9)
    go, gl = torch.randn_like(o1), torch.randn_like(l1)
    g1 = torch.autograd.grad((o1 * go).sum() + (torch.where(fin, l1, 0) * gl).sum(), leaves, allow_unused=True)
    g2 = torch.autograd.grad((o2 * go).sum() + (torch.where(fin, l2, 0) * gl).sum(), leaves, allow_unused=True)
    for a, b in zip(g1, g2):
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("window_zero_relpos", "routed_perhead_kvvalid_indexed",
                                                                 "segments_cross_bias", "causal_gmm_add_bias")],
                         ids=lambda c: c[0])
def test_chunked_recompute_path_matches(case, monkeypatch):
    """Tiny chunk budget: many chunks, backward recomputes each chunk."""
    lay, q, k, v, bias, sm = _run_case(case, seed=1)
    leaves = [q, k, v] + modifier_leaves(bias, sm)
    for t in leaves:
        t.requires_grad_(True)
    o2, l2 = dense_oracle(q, k, v, lay, bias=bias, score_mod=sm)
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(ref, "RECOMPUTE_ABOVE", 0)
    o1, l1 = zk.attention(q, k, v, lay, bias=bias, score_mod=sm, return_lse=True)
    torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
    fin = torch.isfinite(l2)
    go, gl = torch.randn_like(o1), torch.randn_like(l1)
    g1 = torch.autograd.grad((o1 * go).sum() + (torch.where(fin, l1, 0) * gl).sum(), leaves)
    g2 = torch.autograd.grad((o2 * go).sum() + (torch.where(fin, l2, 0) * gl).sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


GRADCHECK = ["window_zero_relpos", "window_clamp_stride2_relpos", "window_zero_kvvalid_dense", "routed",
             "routed_perhead_kvvalid_indexed", "segments_cross_bias", "causal_prefix_kvcache", "dense_mask",
             "dense_relpos", "dense_gmm_mul", "causal_gmm_add_bias", "key_lists_dense_rows_padded"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in GRADCHECK], ids=lambda c: c[0])
def test_gradcheck_fp64(case):
    lay, q, k, v, bias, sm = _run_case(case, B=2, H=2, D=4, Dv=3, seed=2)
    n_bias = len(modifier_leaves(bias, sm))
    inputs = [q, k, v] + modifier_leaves(bias, sm)
    for t in inputs:
        t.requires_grad_(True)

    def fn(q, k, v, *bt):
        b, s = rebuild_modifiers(bias, sm, list(bt))
        o, l = zk.attention(q, k, v, lay, bias=b, score_mod=s, return_lse=True)
        return o, torch.where(torch.isfinite(l), l, torch.zeros_like(l))

    assert len(inputs) == 3 + n_bias
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_dense_fast_path_is_sdpa_and_dv_differs():
    q, k, v = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 19, 8), torch.randn(2, 3, 19, 5)
    o = zk.attention(q, k, v)
    o2, _ = dense_oracle(q, k, v)
    torch.testing.assert_close(o, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_return_input_dtype_fp32_lse(dtype):
    lay = zk.window_2d(8, 8, 4, 1)
    q, k, v = (torch.randn(1, 2, 64, 16).to(dtype) for _ in range(3))
    o, l = zk.attention(q, k, v, lay, return_lse=True)
    assert o.dtype == dtype and l.dtype == torch.float32
    o2, _ = dense_oracle(q.double(), k.double(), v.double(), lay)
    torch.testing.assert_close(o.double(), o2, atol=2e-2, rtol=2e-2)


def test_fully_masked_rows_zero_out_and_neg_inf_lse():
    ids = torch.tensor([[0, 0, -1, 1, 2, -1]])
    kv = torch.tensor([[0, 0, 1, -1, -1, 5]])          # id 2 has no keys
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    o, l = zk.attention(q, k, v, zk.segments(ids, kv), return_lse=True)
    assert torch.all(o[:, :, [2, 4, 5]] == 0) and torch.all(l[:, :, [2, 4, 5]] == float("-inf"))
    assert torch.isfinite(l[:, :, [0, 1, 3]]).all()
    (o.sum() + torch.where(torch.isfinite(l), l, 0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # window whose only keys are all padding
    lay = zk.window_2d(4, 4, 2, 0, kv_valid=~torch.isin(torch.arange(16), torch.tensor([0, 1, 4, 5]))[None])
    q2, k2, v2 = (torch.randn(1, 1, 16, 4, requires_grad=True) for _ in range(3))
    o2, l2 = zk.attention(q2, k2, v2, lay, return_lse=True)
    assert torch.all(o2[0, 0, [0, 1, 4, 5]] == 0) and torch.isneginf(l2[0, 0, [0, 1, 4, 5]]).all()
    assert torch.isfinite(l2[0, 0, [2, 3, 6, 7]]).all()
    o2.sum().backward()
    assert torch.isfinite(q2.grad).all() and torch.isfinite(k2.grad).all()


def test_window_zero_border_virtual_keys_match_timm_unfold():
    """border='zero' = zero-padded halo that takes part in the softmax (timm HaloAttn)."""
    B, H, h, w, bs, halo, d = 1, 2, 8, 8, 4, 1, 8
    q, k, v = (torch.randn(B, H, h * w, d) for _ in range(3))
    win = bs + 2 * halo

    def blocks(t):
        return t.view(B, H, h // bs, bs, w // bs, bs, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, -1, bs * bs, d)

    def windows(t):
        m = F.pad(t.view(B, H, h, w, d), (0, 0, halo, halo, halo, halo))
        u = m.unfold(2, win, bs).unfold(3, win, bs)
        return u.permute(0, 1, 2, 3, 5, 6, 4).reshape(B, H, -1, win * win, d)

    att = (blocks(q) @ windows(k).transpose(-1, -2) * d ** -0.5).softmax(-1)
    o_timm = att @ windows(v)
    o_timm = o_timm.view(B, H, h // bs, w // bs, bs, bs, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, h * w, d)
    torch.testing.assert_close(zk.attention(q, k, v, zk.window_2d(h, w, bs, halo)), o_timm, atol=1e-6, rtol=1e-5)


def test_window_clamp_is_natten_shifted_window():
    lay = zk.window_2d(8, 8, 2, 2, border="clamp")      # 6x6 window, shifted at borders
    m = lay.to_dense_mask()[0, 0].view(8, 8, 8, 8)
    assert m[0, 0].sum() == 36 and m[0, 0, :6, :6].all()          # corner block: window [0, 6)
    assert m[7, 7, 2:, 2:].all() and m[7, 7].sum() == 36
    assert m[4, 4, 2:8, 2:8].all() and m[4, 4].sum() == 36        # block (2,2): window [2, 8)


def test_causal_prefix_semantics():
    m = zk.causal(3, 5, prefix=4).to_dense_mask()[0, 0]
    # offset 2: query 0 -> i+off = 2 < prefix: sees keys 0..3; query 2 -> 4 sees 0..4
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, False], [True] * 5]


def test_varlen_equals_per_sequence_sdpa():
    cu = torch.tensor([0, 3, 10, 16])
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    o = zk.attention(q, k, v, zk.varlen(cu))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(o[:, :, a:b], F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]),
                                   atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="built for"):
        zk.attention(q, q, q, zk.window_2d(8, 8, 4, 1))
    with pytest.raises(ValueError, match="multiples of block"):
        zk.window_2d(6, 8, 4, 1)
    with pytest.raises(ValueError, match="border"):
        zk.window_2d(8, 8, 4, 1, border="reflect")
    with pytest.raises(ValueError, match="4-D"):
        zk.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="one dtype"):
        zk.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="does not broadcast"):
        zk.attention(q, q, q, bias=torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="backend"):
        zk.attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        zk.attention(q, q, q, backend="flex")
    with pytest.raises(ValueError, match=r"\[0, nR=4\)"):
        zk.routed_topk(torch.tensor([[[0, 4]]]).expand(1, 4, 2), 4)
    with pytest.raises(ValueError, match="k >= 1"):
        zk.routed_topk(torch.zeros(1, 4, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="head dims must be >= 1"):
        zk.attention(q[..., :0], q[..., :0], q[..., :0])
    with pytest.raises(ValueError, match="batch"):
        zk.attention(torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8),
                     zk.segments(torch.zeros(2, 16, dtype=torch.long)))
    with pytest.raises(ValueError, match="R >="):
        zk.attention(torch.randn(1, 1, 64, 4), torch.randn(1, 1, 64, 4), torch.randn(1, 1, 64, 4),
                     zk.window_2d(8, 8, 4, 1), bias=zk.RelPosBias(torch.randn(1, 1, 64, 5), torch.randn(1, 1, 64, 11)))
    with pytest.raises(ValueError, match="q_grid"):
        zk.attention(q, q, q, bias=zk.RelPosBias(torch.randn(1, 2, 16, 7), torch.randn(1, 2, 16, 7)))
    with pytest.raises(ValueError, match="odd"):
        zk.RelPosBias(torch.randn(1, 2, 16, 6), torch.randn(1, 2, 16, 7))
    with pytest.raises(ValueError, match=r"\[0, T=3\)"):
        zk.IndexedBias(torch.randn(2, 3), torch.full((1, 16, 16), 3))
    with pytest.raises(ValueError, match="grid"):
        zk.attention(q, q, q, score_mod=zk.GaussianMixture(torch.randn(2, 1), torch.ones(2, 1), (3, 3)))
    with pytest.raises(TypeError, match="layout"):
        zk.attention(q, q, q, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="start at 0"):
        zk.varlen(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="bool"):
        zk.from_dense_mask(torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"kv_len=16\) or -1"):
        zk.key_lists(torch.tensor([[[[0, 16]]]]), 16)
    with pytest.raises(ValueError, match="same key twice"):
        zk.key_lists(torch.tensor([[[[3, 1, 3]]]]), 16)
    with pytest.raises(ValueError, match="int64/int32"):
        zk.key_lists(torch.zeros(1, 1, 4, 2), 16)
    with pytest.raises(ValueError, match="dense_rows"):
        zk.key_lists(torch.zeros(1, 1, 4, 2, dtype=torch.long), 16, dense_rows=5)
    with pytest.raises(ValueError, match="built for"):
        zk.attention(q, q, q, zk.key_lists(torch.tensor([0, 1]).expand(1, 1, 16, 2), 12))


def test_key_lists_sparse_path_equals_masked_sdpa_at_model_shape():
    """The CSR path (not the mask fallback) at a Sparsifiner-like shape: 65 tokens, cls row dense,
    ceil(0.25 N) keys per row; forward, lse and all three gradients against masked SDPA in fp32."""
    from zoo.kernels.reference import key_lists as rowsparse
    torch.manual_seed(0)
    B, H, N, D = 2, 3, 65, 16
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    idx = torch.rand(B, H, N, N).topk(17, -1).indices
    lay = zk.key_lists(idx, N, dense_rows=1, validate=False)
    assert rowsparse.supports(lay, q, None, None)
    mask = lay.to_dense_mask()
    assert mask[:, :, 0].all() and (mask[:, :, 1:].sum(-1) == 17).all()
    o1, l1 = zk.attention(q, k, v, lay, return_lse=True)
    o2 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    l2 = torch.logsumexp((q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    go, gl = torch.randn_like(o1), torch.randn_like(l1)
    g1 = torch.autograd.grad((o1 * go).sum() + (l1 * gl).sum(), (q, k, v))
    g2 = torch.autograd.grad((o2 * go).sum() + (l2 * gl).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the layout keeps its CSR pattern for reuse (forward and backward build it once)
    assert len(lay._cache) == 1


def test_routed_kv_valid_broadcast_over_batch():
    # kv_valid given once (1, L) for a batch of 2 and per-sample routing: must equal the oracle
    torch.manual_seed(0)
    B, H, nR, S, D = 2, 2, 4, 4, 8
    q, k, v = (torch.randn(B, H, nR * S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    topk = torch.stack([torch.randperm(nR)[:2] for _ in range(B * nR)]).view(B, nR, 2)
    valid = torch.ones(1, nR * S, dtype=torch.bool)
    valid[:, -3:] = False
    lay = zk.routed_topk(topk, S, kv_valid=valid)
    out = zk.attention(q, k, v, lay)
    ref_out, _ = dense_oracle(q, k, v, lay)
    torch.testing.assert_close(out, ref_out)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref_out, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_post,layout", [(True, None), (False, "causal"), (True, "key_lists")])
def test_talking_heads_matches_oracle_and_gradcheck(with_post, layout):
    """head_mix (CaiT talking heads) with the GMM score mod and a bias: forward, lse and every
    gradient (q, k, v, pre, post, alpha, sigma, bias) against the dense oracle; fp64 gradcheck."""
    torch.manual_seed(3)
    B, H, N, D = 2, 3, 10, 4
    lay = {None: None, "causal": zk.causal(N),
           "key_lists": zk.key_lists(_key_lists(B, 1, N, N, 4, seed=1), N, dense_rows=1)}[layout]
    q, k, v = _rand(B, H, N, D), _rand(B, H, N, D), _rand(B, H, N, 5)
    pre, post = _rand(H, H), (_rand(H, H) if with_post else None)
    alpha, sigma = _rand(H, 2), torch.rand(H, 2, dtype=DT) + 0.5
    bias = _rand(1, H, N, N)
    leaves = [t for t in (q, k, v, pre, post, alpha, sigma, bias) if t is not None]
    for t in leaves:
        t.requires_grad_(True)

    def run(fn, *ts):
        it = iter(ts)
        q_, k_, v_, pre_ = next(it), next(it), next(it), next(it)
        post_ = next(it) if with_post else None
        a_, s_, b_ = next(it), next(it), next(it)
        sm = zk.GaussianMixture(a_, s_, (3, 3), num_prefix_tokens=1)
        return fn(q_, k_, v_, lay, sm, b_, zk.TalkingHeads(pre_, post_))

    op = lambda q_, k_, v_, lay_, sm, b_, th: zk.attention(q_, k_, v_, lay_, bias=b_, score_mod=sm, head_mix=th,
                                                           return_lse=True, scale=0.7)
    oracle = lambda q_, k_, v_, lay_, sm, b_, th: dense_oracle(q_, k_, v_, lay_, bias=b_, score_mod=sm, head_mix=th,
                                                               scale=0.7)
    o1, l1 = run(op, *leaves)
    o2, l2 = run(oracle, *leaves)
    fin = torch.isfinite(l2)
    torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(l1[fin], l2[fin], atol=1e-10, rtol=1e-9)
    go = torch.randn_like(o1)
    for a, b in zip(torch.autograd.grad((o1 * go).sum(), leaves), torch.autograd.grad((o2 * go).sum(), leaves)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)
    assert torch.autograd.gradcheck(lambda *ts: run(op, *ts)[0], leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_talking_heads_bad_input(monkeypatch):
    from zoo.kernels.triton import _common
    # CPU tensors pass the Triton device check, with or without TRITON_INTERPRET
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: True)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="square"):
        zk.TalkingHeads(torch.randn(2, 3))
    with pytest.raises(ValueError, match="q has 2 heads"):
        zk.attention(q, q, q, head_mix=zk.TalkingHeads(torch.randn(3, 3)))
    with pytest.raises(ValueError, match="reference backend only"):
        zk.attention(q, q, q, head_mix=zk.TalkingHeads(torch.randn(2, 2)), backend="triton")
    with pytest.raises(ValueError, match="dense, causal"):
        zk.attention(q, q, q, zk.window_2d(4, 4, 2, 1), head_mix=zk.TalkingHeads(torch.randn(2, 2)))


def test_routed_many_small_regions_take_the_dense_mask_sdpa_path(monkeypatch):
    """Routed layouts keeping >= 25 % of the regions run as one SDPA over the dense mask (faster on
    CPU for BiFormer's stage 3); same values and gradients as the gathered path and the oracle,
    duplicates in the top-k lists attended once."""
    torch.manual_seed(0)
    B, H, nR, S, kk = 2, 3, 16, 4, 6
    ti = torch.stack([torch.randperm(nR)[:kk] for _ in range(B * nR)]).view(B, nR, kk)
    ti[0, 2, 1] = ti[0, 2, 0]
    lay = zk.routed_topk(ti, S)
    q, k, v = (_rand(B, H, nR * S, 8, requires_grad=True) for _ in range(3))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(routed.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw.get("attn_mask")) or real(*a, **kw))
    o1 = zk.attention(q, k, v, lay, scale=0.3)
    assert calls and calls[0] is not None and calls[0].dtype == torch.bool
    o2, _ = dense_oracle(q, k, v, lay, scale=0.3)
    monkeypatch.setattr(routed, "DENSE_ROUTED_FRACTION", 2.0)       # force the gathered path
    o3 = zk.attention(q, k, v, lay, scale=0.3)
    torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(o3, o2, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(o1)
    for a, b in zip(torch.autograd.grad((o1 * g).sum(), (q, k, v)), torch.autograd.grad((o2 * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


def _geometry(name, B, H, Lq, Lk, D):
    """q, k, v (fp64 leaves) and the (B, H, L, D) views handed to the op, in several memory layouts."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    if name == "packed_qkv":                      # (B, L, 3, H, D) from one projection; Lq == Lk
        qkv = r(B, Lq, 3, H, D).requires_grad_(True)
        return [qkv], lambda qkv: qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if name == "heads_last":                      # (B, L, H, D) transposed
        ts = [r(B, Lq, H, D).requires_grad_(True), r(B, Lk, H, D).requires_grad_(True),
              r(B, Lk, H, D).requires_grad_(True)]
        return ts, lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if name == "kv_shared_heads":                 # one k/v head expanded (stride 0) over H
        ts = [r(B, H, Lq, D).requires_grad_(True), r(B, 1, Lk, D).requires_grad_(True),
              r(B, 1, Lk, D).requires_grad_(True)]
        return ts, lambda q, k, v: (q, k.expand(B, H, Lk, D), v.expand(B, H, Lk, D))
    if name == "q_strided_dim":                   # every other channel: not whole rows -> copied
        ts = [r(B, H, Lq, 2 * D).requires_grad_(True), r(B, H, Lk, D).requires_grad_(True),
              r(B, Lk, H, D).requires_grad_(True)]
        return ts, lambda q, k, v: (q[..., ::2], k, v.transpose(1, 2))
    if name == "q_expanded_heads":                # one q head read by all H: overlapping rows -> copied
        ts = [r(B, 1, Lq, D).requires_grad_(True), r(B, H, Lk, D).requires_grad_(True),
              r(B, H, Lk, D).requires_grad_(True)]
        return ts, lambda q, k, v: (q.expand(B, H, Lq, D), k, v)
    raise KeyError(name)


@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("dense_rows,idx_shape", [(1, "full"), (0, "batch_bcast"), (2, "head_bcast")])
@pytest.mark.parametrize("geometry", ["packed_qkv", "heads_last", "kv_shared_heads", "q_strided_dim",
                                      "q_expanded_heads"])
def test_key_lists_any_operand_layout(geometry, dense_rows, idx_shape, with_lse):
    """The CSR path reads q, k, v in place (packed qkv, transposed, stride-0 heads) or copies them when
    their vectors are not whole storage rows; forward, lse and all gradients equal the oracle, with
    and without a gradient flowing into the lse."""
    from zoo.kernels.reference import key_lists as rowsparse
    B, H, L, D = 2, 3, 12, 4
    leaves, views = _geometry(geometry, B, H, L, L, D)
    q, k, v = views(*leaves)
    ib, ih = {"full": (B, H), "batch_bcast": (1, H), "head_bcast": (B, 1)}[idx_shape]
    idx = _key_lists(ib, ih, L, L, 5, seed=4)
    lay = zk.key_lists(idx, L, dense_rows=dense_rows)
    assert rowsparse.supports(lay, q, None, None)
    o1, l1 = zk.attention(q, k, v, lay, scale=0.4, return_lse=True)
    o2, l2 = dense_oracle(q, k, v, lay, scale=0.4)
    fin = torch.isfinite(l2)
    assert torch.equal(torch.isfinite(l1), fin)
    torch.testing.assert_close(o1, o2, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(l1[fin], l2[fin], atol=1e-12, rtol=1e-10)
    go, gl = torch.randn_like(o1), torch.randn_like(l1) * with_lse
    if not with_lse:
        o1 = zk.attention(q, k, v, lay, scale=0.4)
    lse_term = lambda l: (torch.where(fin, l, 0) * gl).sum() if with_lse else 0
    g1 = torch.autograd.grad((o1 * go).sum() + lse_term(l1), leaves)
    g2 = torch.autograd.grad((o2 * go).sum() + lse_term(l2), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)
    pat = next(iter(lay._cache.values()))
    copied = [gm is None for gm in pat.fr.geom]
    assert copied[0] == (geometry in ("q_strided_dim", "q_expanded_heads")) and not any(copied[1:])
    if geometry == "packed_qkv":     # output laid out like q: merging heads is a view
        assert o1.transpose(1, 2).is_contiguous()
        o1.transpose(1, 2).view(B, L, H * D)


@pytest.mark.parametrize("geometry", ["packed_qkv", "kv_shared_heads", "q_expanded_heads"])
def test_key_lists_sparse_transpose_backward(geometry, monkeypatch):
    """Large maps take dk, dv from the transposed CSR (entries sorted by key) instead of the dense
    scratch buffer: same gradients."""
    from zoo.kernels.reference import key_lists as rowsparse
    monkeypatch.setattr(rowsparse, "DENSE_TRANSPOSE_MAX", 0)
    B, H, L, D = 2, 3, 12, 4
    leaves, views = _geometry(geometry, B, H, L, L, D)
    q, k, v = views(*leaves)
    lay = zk.key_lists(_key_lists(B, H, L, L, 5, seed=6), L, dense_rows=1)
    o1 = zk.attention(q, k, v, lay, scale=0.4)
    o2, _ = dense_oracle(q, k, v, lay, scale=0.4)
    go = torch.randn_like(o1)
    for a, b in zip(torch.autograd.grad(o1, leaves, go), torch.autograd.grad(o2, leaves, go)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)
    assert next(iter(lay._cache.values()))._t is not None      # the sorted transpose was used


def test_key_lists_gradcheck_packed_qkv():
    from torch.autograd import gradcheck
    B, H, L, D = 1, 2, 7, 3
    leaves, views = _geometry("packed_qkv", B, H, L, L, D)
    lay = zk.key_lists(_key_lists(B, H, L, L, 3, seed=5), L, dense_rows=1)

    def fn(t):
        o, l = zk.attention(*views(t), lay, return_lse=True)
        return o, torch.where(torch.isfinite(l), l, torch.zeros_like(l))
    assert gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_key_lists_operands_at_odd_storage_offsets_and_modes():
    """Contiguous q/k/v at a storage offset that is not a row multiple are copied (not misread);
    the reused inference buffer works across inference_mode / no_grad / autograd; an empty batch
    falls back cleanly."""
    torch.manual_seed(0)
    B, H, L, D = 2, 2, 9, 4
    flat = torch.randn(1 + 3 * B * H * L * D, dtype=torch.float64)
    q, k, v = (flat[1 + i * B * H * L * D: 1 + (i + 1) * B * H * L * D].view(B, H, L, D) for i in range(3))
    lay = zk.key_lists(_key_lists(B, H, L, L, 3, seed=7), L, dense_rows=1)
    want, _ = dense_oracle(q, k, v, lay)
    torch.testing.assert_close(zk.attention(q, k, v, lay), want)
    with torch.inference_mode():
        torch.testing.assert_close(zk.attention(q, k, v, lay), want)
    with torch.no_grad():
        torch.testing.assert_close(zk.attention(q, k, v, lay), want)
    qg = q.clone().requires_grad_(True)
    kg = k.clone().requires_grad_(True)
    zk.attention(qg, kg, v, lay).sum().backward()
    assert kg.grad is not None and torch.isfinite(kg.grad).all()
    e = torch.zeros(0, H, L, D)
    assert zk.attention(e, e, e, zk.key_lists(torch.zeros(1, H, L, 2, dtype=torch.long) + torch.arange(2), L)).shape == e.shape
