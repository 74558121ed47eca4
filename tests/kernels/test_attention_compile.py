"""zoo.kernels.attention as a torch.library custom op: opcheck, autograd through the op, and a
small torch.compile(fullgraph=True) call against eager (CPU)."""
import torch

import zoo.kernels as zk
from zoo.kernels.custom_op import flatten, force_custom_op


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    B, H, h, w, D = 1, 2, 4, 4, 8
    lay = zk.window_2d(h, w, 2, 1, kv_valid=torch.rand(B, h * w) > 0.2)
    q, k, v = (torch.randn(B, H, h * w, D, dtype=dtype, requires_grad=True) for _ in range(3))
    rb = zk.RelPosBias(torch.randn(B, H, h * w, 7, dtype=dtype, requires_grad=True),
                       torch.randn(B, H, h * w, 7, dtype=dtype, requires_grad=True))
    return lay, q, k, v, rb


def test_custom_op_opcheck_and_grads_match_eager():
    lay, q, k, v, rb = _inputs()
    lt, fl, it, meta = flatten(lay, [rb])
    torch.library.opcheck(torch.ops.zoo.attention_ref.default, (q, k, v, lt, fl, it, meta, 0.5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    leaves = [q, k, v, rb.rel_h, rb.rel_w]
    o1, l1 = zk.attention(q, k, v, lay, bias=rb, return_lse=True)
    g1 = torch.autograd.grad(o1.sum() + torch.where(torch.isfinite(l1), l1, 0).sum(), leaves)
    with force_custom_op():
        o2, l2 = zk.attention(q, k, v, lay, bias=rb, return_lse=True)
    g2 = torch.autograd.grad(o2.sum() + torch.where(torch.isfinite(l2), l2, 0).sum(), leaves)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    lay, q, k, v, rb = _inputs(torch.float32)
    topk = torch.tensor([[[0, 1], [1, 2], [3, 0], [2, 3]]])

    def f(q, k, v, rel_h, rel_w, topk):
        a = zk.attention(q, k, v, lay, bias=zk.RelPosBias(rel_h, rel_w))
        b = zk.attention(q, k, v, zk.routed_topk(topk, 4), scale=0.3)
        c = zk.attention(q, k, v, zk.key_lists(topk.repeat_interleave(4, 1)[:, None], 16, dense_rows=1,
                                               validate=False))
        return a + b + c

    args = (q, k, v, rb.rel_h, rb.rel_w, topk)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = cf(*args)
    out_e = f(*args)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    gc = torch.autograd.grad(out_c.square().sum(), args[:5])
    ge = torch.autograd.grad(out_e.square().sum(), args[:5])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
