"""Test helper: a model under torch.compile(fullgraph=True) against eager, eval and train."""
import torch


def assert_compiled_matches_eager(model, inputs, min_grads, backend="aot_eager"):
    """fullgraph=True (0 graph breaks) on ``model(**inputs)``: the eval output, the train output
    and every parameter gradient of a weighted-sum loss equal eager's (rtol 1e-4, atol 1e-5);
    at least ``min_grads`` parameters get a gradient."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-4, atol=1e-5)
    model.train()
    res = []
    for fn in (model, compiled):
        model.zero_grad()
        out = fn(**inputs)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        res.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (oe, ge), (oc, gc) = res
    torch.testing.assert_close(oc, oe, rtol=1e-4, atol=1e-5)
    assert ge.keys() == gc.keys() and len(ge) > min_grads
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-4, atol=1e-5, msg=k)
