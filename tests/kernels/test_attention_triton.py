"""The Triton kernels themselves, run on CPU by Triton's interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py), against the naive dense oracle: forward, lse and every gradient, fp32 and fp16,
for every layout builder, every bias kind, the GMM score mod, ragged lengths, fully masked rows and
duplicate routed entries. Shapes are tiny (<= 16 programs per launch)."""
import os

import pytest
import torch

import zoo.kernels as zk
from _modifiers import modifier_leaves, rebuild_modifiers
from zoo.kernels import triton as ta
from zoo.kernels.lut import build_lut
from zoo.kernels.reference import dense_oracle

pytestmark = pytest.mark.skipif(not ta.interpreter_enabled(),
                                reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it)")

B, H = 1, 2


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setitem(ta.TILE_OPTIONS, "block_m", 16)
    monkeypatch.setitem(ta.TILE_OPTIONS, "block_n", 16)


def _r(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


def _key_lists(g):
    idx = torch.rand(B, H, 40, 36, generator=g).topk(7, -1).indices
    idx[:, :, 4, :3] = -1
    idx[0, 1, 9] = -1          # a row with no key
    return idx


def _cases():
    g = torch.Generator().manual_seed(0)
    kvv = torch.rand(B, 64, generator=g) > 0.3
    dup = torch.tensor([[[0, 0], [1, 3], [2, 2], [3, 0]], [[1, 1], [0, 2], [3, 3], [2, 1]]])[None]
    seg_q = torch.tensor([[0] * 10 + [1] * 12 + [-1] * 3 + [2] * 15])
    seg_k = torch.tensor([[0] * 10 + [1] * 12 + [-1] * 3 + [3] * 15])     # id 2 has no keys
    return {
        "window_zero_relpos": (64, 64, lambda: zk.window_2d(8, 8, 4, 1),
                               lambda dt: zk.RelPosBias(_r(B, H, 64, 11, dtype=dt), _r(B, H, 64, 11, dtype=dt)), None),
        "window_clamp_stride2_relpos": (16, 64, lambda: zk.window_2d(8, 8, 4, 1, border="clamp", stride=2),
                                        lambda dt: zk.RelPosBias(_r(B, H, 16, 11, dtype=dt), _r(B, H, 16, 11, dtype=dt)),
                                        None),
        "window_zero_kvvalid_indexed": (64, 64, lambda: zk.window_2d(8, 8, 4, 2, kv_valid=kvv),
                                        lambda dt: zk.IndexedBias(_r(H, 5, dtype=dt), torch.randint(0, 5, (B, 64, 64))),
                                        None),
        "routed_duplicates_kvvalid_perhead": (64, 64, lambda: zk.routed_topk(dup, 16, kv_valid=kvv), None, None),
        "routed_region4_dense_bias": (32, 32, lambda: zk.routed_topk(torch.randint(0, 8, (B, 8, 3), generator=g), 4),
                                      lambda dt: _r(B, H, 32, 32, dtype=dt), None),
        "segments_ragged_empty_rows": (40, 40, lambda: zk.segments(seg_q, seg_k), None, None),
        "varlen": (37, 37, lambda: zk.varlen(torch.tensor([0, 5, 21, 37])), None, None),
        "causal_prefix_kvcache_indexed": (20, 40, lambda: zk.causal(20, 40, prefix=30, kv_valid=kvv[:, :40]),
                                          lambda dt: zk.IndexedBias(_r(H, 3, dtype=dt), torch.randint(0, 3, (1, 20, 40))),
                                          None),
        "key_lists_dense_row_padded": (40, 36, lambda: zk.key_lists(_key_lists(g), 36, dense_rows=1), None, None),
        "dense_mask_perhead": (40, 36, lambda: zk.from_dense_mask(torch.rand(B, H, 40, 36, generator=g) > 0.7), None, None),
        "dense_relpos_grid": (42, 42, lambda: None,
                              lambda dt: zk.RelPosBias(_r(B, H, 42, 11, dtype=dt), _r(B, H, 42, 13, dtype=dt), (6, 7), (6, 7)),
                              None),
        "dense_gmm_mul_prefix": (50, 50, lambda: None, None,
                                 lambda dt: zk.GaussianMixture(_r(H, 3, dtype=dt), (torch.rand(H, 3) + 0.5).to(dt), (7, 7),
                                                               num_prefix_tokens=1)),
        "causal_gmm_add_broadcast_bias": (49, 49, lambda: zk.causal(49), lambda dt: _r(1, H, 1, 49, dtype=dt),
                                          lambda dt: zk.GaussianMixture(_r(1, 2, dtype=dt), (torch.rand(1, 2) + 0.5).to(dt),
                                                                        (7, 7), mode="add")),
    }


CASES = _cases()
FP16 = ["window_zero_relpos", "routed_duplicates_kvvalid_perhead", "segments_ragged_empty_rows", "dense_gmm_mul_prefix"]


def _to(obj, dev):
    """Move a layout / bias / score-mod object's tensors to `dev` (GPU variant of these tests)."""
    if obj is None or isinstance(obj, torch.Tensor):
        return obj.to(dev) if obj is not None else None
    for n, val in list(vars(obj).items()):
        if isinstance(val, torch.Tensor):
            setattr(obj, n, val.to(dev))
        if n == "_groups" and val is not None:
            obj._groups = tuple(t.to(dev) for t in val)
    return obj


def _check(name, dtype, D=16, Dv=16, scale=None, device="cpu"):
    torch.manual_seed(1)
    Lq, Lk, mk_lay, mk_bias, mk_sm = CASES[name]
    lay = _to(mk_lay(), device)
    bias = _to(mk_bias(dtype), device) if mk_bias else None
    sm = _to(mk_sm(dtype), device) if mk_sm else None
    q, k, v = (_r(B, H, L, d, dtype=dtype).to(device) for L, d in ((Lq, D), (Lk, D), (Lk, Dv)))
    leaves = [q, k, v] + modifier_leaves(bias, sm)
    for t in leaves:
        t.requires_grad_(True)
    o, l = zk.attention(q, k, v, lay, bias=bias, score_mod=sm, scale=scale, return_lse=True, backend="triton")
    assert o.dtype == dtype and l.dtype == torch.float32
    fin = torch.isfinite(l)
    go, gl = torch.randn_like(o), torch.randn_like(l)
    g1 = torch.autograd.grad((o * go).sum() + (torch.where(fin, l, 0) * gl).sum(), leaves)

    dl = [t.detach().double().requires_grad_(True) for t in leaves]
    b2, s2 = rebuild_modifiers(bias, sm, dl[3:])
    o2, l2 = dense_oracle(dl[0], dl[1], dl[2], lay, bias=b2, score_mod=s2, scale=scale)
    fin2 = torch.isfinite(l2)
    g2 = torch.autograd.grad((o2 * go.double()).sum() + (torch.where(fin2, l2, 0) * gl.double()).sum(), dl)
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
           torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}[dtype]
    assert torch.equal(fin, fin2)
    assert torch.all(o[~fin[..., None].expand_as(o)] == 0)
    torch.testing.assert_close(o.double(), o2, **tol)
    torch.testing.assert_close(l[fin].double(), l2[fin2], **tol)
    for a, b, t in zip(g1, g2, leaves):
        assert torch.isfinite(a).all()
        scale_ = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale_, b / scale_, **tol)
    return lay, l


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_fp32(name):
    lay, lse = _check(name, torch.float32)
    if name == "segments_ragged_empty_rows":
        assert torch.isneginf(lse[..., 22:25]).all() and torch.isneginf(lse[..., 25:]).all()
    if name == "routed_duplicates_kvvalid_perhead":
        lut = build_lut(lay, 64, 64, torch.device("cpu"))
        counts = lut.kv_num + lut.full_num
        assert counts[0, 0].tolist() == [1, 2, 1, 2]          # [0, 0] and [2, 2] collapse
        for r in range(4):
            idx = lut.kv_idx[0, 0, r, :lut.kv_num[0, 0, r]].tolist()
            assert len(idx) == len(set(idx))


@pytest.mark.parametrize("name", FP16)
def test_triton_interpreter_fp16(name):
    _check(name, torch.float16)


def test_triton_head_dims_padded_and_dv_differs():
    CASES["dense_d24"] = (30, 30, lambda: None, None, None)
    try:
        _check("dense_d24", torch.float32, D=24, Dv=40, scale=0.3)
    finally:
        del CASES["dense_d24"]


def test_triton_rejects_bad_input():
    q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        zk.attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 16, 320)
    with pytest.raises(ValueError, match="256"):
        zk.attention(q, q, q, backend="triton")


# -- key lists: the gather kernel (triton/key_lists.py), never the element mask ----------------------
def _keylist_case(B_, H_, Lq, Lk, K, idx_b, idx_h, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(idx_b, idx_h, Lq, Lk, generator=g).topk(K, -1).indices
    if Lq > 6 and K > 2:
        idx[..., 5, :2] = -1                 # unused slots
        idx[0, 0, 6] = -1                    # a sparse row with no key
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    # B, H, Lq, Lk, K, idx (B|1, H|1), dense_rows, D, Dv, packed qkv
    (2, 3, 37, 37, 6, (2, 3), 1, 24, 24, True),     # Sparsifiner-like: cls row dense, q/k/v views of one qkv
    (1, 2, 40, 29, 5, (1, 2), 0, 16, 40, False),    # Lq != Lk, Dv != D, lists shared across the batch
    (2, 2, 21, 50, 1, (2, 1), 18, 32, 16, False),   # one key per row, lists shared by heads, most rows dense
])
def test_triton_key_lists_gather_kernel(shape, dtype, monkeypatch):
    from zoo.kernels.triton import key_lists as keylist_triton
    from zoo.kernels import KeyListLayout

    def no_mask(self):
        raise AssertionError("the Triton key-lists path must not build the dense mask")

    monkeypatch.setattr(KeyListLayout, "as_mask", no_mask)
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0)     # these lists keep up to 16 %
    B_, H_, Lq, Lk, K, (ib, ih), d, D, Dv, packed = shape
    torch.manual_seed(3)
    lay = zk.key_lists(_keylist_case(B_, H_, Lq, Lk, K, ib, ih, seed=4), Lk, dense_rows=d)
    if packed:
        qkv = _r(B_, Lq, 3, H_, D, dtype=dtype).requires_grad_(True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        leaves = [qkv]
    else:
        q, k, v = (_r(B_, H_, L, e, dtype=dtype).requires_grad_(True) for L, e in ((Lq, D), (Lk, D), (Lk, Dv)))
        leaves = [q, k, v]
    o, l = zk.attention(q, k, v, lay, scale=0.4, return_lse=True, backend="triton")
    assert o.dtype == dtype and l.dtype == torch.float32
    go, gl = torch.randn_like(o), torch.randn_like(l)
    fin = torch.isfinite(l)
    g1 = torch.autograd.grad((o * go).sum() + (torch.where(fin, l, 0) * gl).sum(), leaves)

    dl = [t.detach().double().requires_grad_(True) for t in leaves]
    qd, kd, vd = dl[0].permute(2, 0, 3, 1, 4).unbind(0) if packed else dl
    o2, l2 = dense_oracle(qd, kd, vd, lay, scale=0.4)
    fin2 = torch.isfinite(l2)
    g2 = torch.autograd.grad((o2 * go.double()).sum() + (torch.where(fin2, l2, 0) * gl.double()).sum(), dl)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert torch.equal(fin, fin2) and (K == 1 or not fin.all())      # the empty row has lse -inf, output 0
    assert torch.all(o[~fin[..., None].expand_as(o)] == 0)
    torch.testing.assert_close(o.double(), o2, **tol)
    torch.testing.assert_close(l[fin].double(), l2[fin2], **tol)
    for a, b in zip(g1, g2):
        scale_ = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale_, b / scale_, **tol)


def test_triton_key_lists_dispatch_sparse_lists_gather_dense_lists_mask(monkeypatch):
    """Lists keeping <= 1/16 of the keys go to the gather kernel, denser ones to the block-sparse
    kernel on their element mask (tensor cores), unless that mask would be too large."""
    from zoo.kernels.triton import key_lists as keylist_triton
    from zoo.kernels import KeyListLayout
    calls = []
    as_mask = KeyListLayout.as_mask
    monkeypatch.setattr(KeyListLayout, "as_mask", lambda self: calls.append("mask") or as_mask(self))
    gather = keylist_triton.keylist_attention
    monkeypatch.setattr(keylist_triton, "keylist_attention", lambda *a: calls.append("gather") or gather(*a))
    q = _r(1, 2, 40, 16)
    for K, want in ((2, "gather"), (10, "mask")):                 # 2/40 = 5 %, 10/40 = 25 %
        calls.clear()
        lay = zk.key_lists(_keylist_case(1, 2, 40, 40, K, 1, 2, seed=K), 40, dense_rows=1)
        o = zk.attention(q, q, q, lay, backend="triton")
        assert calls == [want]
        torch.testing.assert_close(o.double(), dense_oracle(q.double(), q.double(), q.double(), lay)[0],
                                   atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(keylist_triton, "MASK_MAX_ELEMENTS", 40 * 40)     # mask too large: gather
    calls.clear()
    zk.attention(q, q, q, lay, backend="triton")
    assert calls == ["gather"]


@pytest.mark.parametrize("extra", ["bias", "score_mod", "deterministic"])
def test_triton_key_lists_mask_kernel_for_bias_score_mod_and_deterministic_mode(extra, monkeypatch):
    """The gather kernel takes plain attention only, and not in deterministic mode (its backward
    uses atomics): with a bias, a score mod or deterministic algorithms the lists become the mask."""
    from zoo.kernels.triton import key_lists as keylist_triton
    from zoo.kernels import KeyListLayout
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0)           # density alone would gather
    calls = []
    as_mask = KeyListLayout.as_mask
    monkeypatch.setattr(KeyListLayout, "as_mask", lambda self: calls.append("mask") or as_mask(self))
    monkeypatch.setattr(keylist_triton, "keylist_attention", lambda *a: calls.append("gather"))
    torch.manual_seed(5)
    lay = zk.key_lists(_keylist_case(1, 2, 25, 25, 4, 1, 2, seed=5), 25, dense_rows=1)
    q, k, v = (_r(1, 2, 25, 16) for _ in range(3))
    kw = dict(bias=_r(1, 2, 25, 25)) if extra == "bias" else \
        dict(score_mod=zk.GaussianMixture(_r(1, 2), torch.rand(1, 2) + 0.5, (5, 5), num_prefix_tokens=0)) \
        if extra == "score_mod" else {}
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(extra == "deterministic", warn_only=True)
    try:
        o = zk.attention(q, k, v, lay, backend="triton", **kw)
    finally:
        torch.use_deterministic_algorithms(det)
    assert calls == ["mask"]
    dkw = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    o2, _ = dense_oracle(q.double(), k.double(), v.double(), lay, **dkw)
    torch.testing.assert_close(o.double(), o2, atol=1e-5, rtol=1e-4)


def test_triton_key_lists_longer_than_the_keys_next_to_dense_rows(monkeypatch):
    """K > Lk (unused slots) in a block that also holds a dense row: every listed slot is walked."""
    from zoo.kernels.triton import key_lists as keylist_triton
    from zoo.kernels import KeyListLayout
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", float("inf"))       # K / Lk = 7 / 4
    monkeypatch.setattr(KeyListLayout, "as_mask", None)                        # (the gather kernel only)
    idx = torch.full((1, 1, 6, 7), -1, dtype=torch.long)
    idx[0, 0, 1:, 4:6] = torch.tensor([[2, 0], [1, 3], [3, 2], [0, 1], [2, 3]])   # keys sit past slot Lk = 4
    idx[0, 0, 3, 6] = 1
    lay = zk.key_lists(idx, 4, dense_rows=1)
    q, k, v = (_r(1, 1, L, 128).requires_grad_(True) for L in (6, 4, 4))     # D 128: 1-slot chunks
    o, l = zk.attention(q, k, v, lay, return_lse=True, backend="triton")
    g = torch.autograd.grad(o.square().sum() + l.sum(), (q, k, v))
    dl = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    o2, l2 = dense_oracle(*dl, lay)
    g2 = torch.autograd.grad(o2.square().sum() + l2.sum(), dl)
    torch.testing.assert_close(o.double(), o2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l.double(), l2, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_triton_key_lists_custom_op_opcheck():
    """The gather kernel's torch.library op (what torch.compile calls): schema, fake tensors, autograd."""
    from zoo.kernels.triton import key_lists  # noqa: F401  registers zoo::attention_keylists
    torch.manual_seed(6)
    idx = _keylist_case(1, 2, 12, 12, 3, 1, 2, seed=6)
    q, k, v = (_r(1, 2, 12, 16).requires_grad_(True) for _ in range(3))
    torch.library.opcheck(torch.ops.zoo.attention_keylists.default, (q, k, v, idx, 12, 1, 0.5))
    # q/k/v as head views of (B, L, H, D) buffers (dense, not contiguous); the backward op's
    # outputs are contiguous and its fake must say so (inductor checks the strides)
    q, k, v = (_r(1, 12, 2, 16).transpose(1, 2) for _ in range(3))
    out, lse = torch.ops.zoo.attention_keylists(q, k, v, idx, 12, 1, 0.5)
    torch.library.opcheck(torch.ops.zoo.attention_keylists_bwd.default,
                          (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, idx, 12, 1, 0.5))


@pytest.mark.parametrize("method", ["triton_args", "triton_grad_buffers"])
def test_triton_lowering_to_an_unknown_slot_is_an_error(method, monkeypatch):
    """A modifier that fills a slot the kernels do not have fails loudly instead of being dropped
    (a dropped gradient buffer would read as a zero gradient)."""
    from zoo.kernels.bias import DenseBias
    lowered = getattr(DenseBias, method)
    monkeypatch.setattr(DenseBias, method, lambda self, *a: {"biass" if method == "triton_args" else "dbiass":
                                                              next(iter(lowered(self, *a).values()))})
    q = _r(1, 2, 16, 16).requires_grad_(True)
    with pytest.raises(KeyError, match="biass.*slots: .*bias"):
        zk.attention(q, q, q, bias=_r(1, 2, 16, 16), backend="triton").sum().backward()
