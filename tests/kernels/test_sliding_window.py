"""`sliding_window`, the layout added by API.md's "Adding a layout" recipe: every backend against
the dense oracle, its LUT against its mask, and its round trip through the custom op."""
import pytest
import torch

import zoo.kernels as zk
from zoo.kernels import triton as ta
from zoo.kernels.custom_op import flatten, force_custom_op, unflatten
from zoo.kernels.lut import build_lut
from zoo.kernels.reference import dense_oracle

SHAPES = [  # q_len, left, right, kv_len
    (37, 4, None, None),      # symmetric
    (37, 6, 0, None),         # causal sliding window
    (21, 2, 5, 30),           # kv longer than q (bottom-right aligned), asymmetric
    (30, 3, 1, 20),           # kv shorter: the first queries' bands start before key 0 (empty rows)
]


def _inputs(lay, dtype=torch.float64, B=2, H=2, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=g, dtype=dtype).requires_grad_(True)
            for L, d in ((lay.q_len, D), (lay.kv_len, D), (lay.kv_len, Dv))]


def _compare(lay, backend, dtype, tol, **kw):
    q, k, v = _inputs(lay, dtype)
    o, l = zk.attention(q, k, v, lay, return_lse=True, backend=backend, **kw)
    fin = torch.isfinite(l)
    g = torch.autograd.grad(o.square().sum() + torch.where(fin, l, 0).sum(), (q, k, v))
    dl = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    dkw = {n: t.double() for n, t in kw.items()}
    o2, l2 = dense_oracle(*dl, lay, **dkw)
    fin2 = torch.isfinite(l2)
    g2 = torch.autograd.grad(o2.square().sum() + torch.where(fin2, l2, 0).sum(), dl)
    assert torch.equal(fin, fin2)
    torch.testing.assert_close(o.double(), o2, **tol)
    torch.testing.assert_close(l[fin].double(), l2[fin2], **tol)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a.double(), b, **tol)


def test_mask_is_the_band():
    # q_len 6, kv_len 8 (offset 2), left 1, right 2: row i attends keys i+1 .. i+4
    want = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 1, 1, 0],
                         [0, 0, 0, 0, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(zk.sliding_window(6, 1, 2, kv_len=8).to_dense_mask()[0, 0], want)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_dense_oracle(shape):
    _compare(zk.sliding_window(shape[0], shape[1], shape[2], kv_len=shape[3]), "reference", torch.float64,
             dict(atol=1e-10, rtol=1e-9))


def test_reference_with_bias_and_custom_op_round_trip():
    lay = zk.sliding_window(25, 3, 2)
    bias = torch.randn(1, 2, 25, 25, dtype=torch.float64)
    _compare(lay, "reference", torch.float64, dict(atol=1e-10, rtol=1e-9), bias=bias)
    lt, fl, it, meta = flatten(lay, [])
    lay2 = unflatten(lt, fl, it, meta)[0]
    assert (lay2.q_len, lay2.kv_len, lay2.left, lay2.right) == (25, 25, 3, 2)
    q, k, v = _inputs(lay)
    with force_custom_op(True):
        o1 = zk.attention(q, k, v, lay)
    torch.testing.assert_close(o1, zk.attention(q, k, v, lay), atol=1e-12, rtol=1e-12)


def test_lut_skips_tiles_outside_the_band_and_covers_it():
    lay = zk.sliding_window(256, 8, 8)
    lut = build_lut(lay, 256, 256, "cpu", 16, 16)
    kept = torch.zeros(16, 16, dtype=torch.bool)
    for qb in range(16):
        for t in range(int(lut.kv_num[0, 0, qb])):
            kept[qb, int(lut.kv_idx[0, 0, qb, t])] = True
        for t in range(int(lut.full_num[0, 0, qb])):
            kept[qb, int(lut.full_idx[0, 0, qb, t])] = True
    tiles = lay.to_dense_mask()[0, 0].view(16, 16, 16, 16).any(3).any(1)
    assert torch.equal(kept, tiles)                      # exactly the tiles the band touches
    assert int(kept.sum()) == 16 + 2 * 15                # a tridiagonal band of tiles, not 256


@pytest.mark.skipif(not ta.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[3]], ids=str)
def test_triton_matches_dense_oracle(shape, monkeypatch):
    monkeypatch.setitem(ta.TILE_OPTIONS, "block_m", 16)
    monkeypatch.setitem(ta.TILE_OPTIONS, "block_n", 16)
    _compare(zk.sliding_window(shape[0], shape[1], shape[2], kv_len=shape[3]), "triton", torch.float32,
             dict(atol=1e-5, rtol=1e-4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="left must be an int >= 0"):
        zk.sliding_window(10, -1)
    with pytest.raises(ValueError, match="built for"):
        q = torch.randn(1, 1, 12, 4)
        zk.attention(q, q, q, zk.sliding_window(10, 2))
