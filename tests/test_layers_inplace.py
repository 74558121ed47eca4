"""zoo.layers.inplace: same results in and out of place; in place only when autograd is off."""
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

from zoo.layers.inplace import add_fresh, batch_norm_fresh, norm_act_fresh


def _bn():
    torch.manual_seed(0)
    bn = BatchNormAct2d(5, act_layer='relu').eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def test_batch_norm_fresh_in_place_without_autograd_equals_functional():
    bn = _bn()
    x = torch.randn(2, 5, 4, 3)
    want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    with torch.no_grad():
        y = x.clone()
        out = batch_norm_fresh(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, want)
    xg = x.clone().requires_grad_(True)
    out = batch_norm_fresh(xg, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert out.data_ptr() != xg.data_ptr() and torch.equal(out.detach(), want)
    out.sum().backward()
    assert xg.grad is not None and bn.weight.grad is not None


def test_norm_act_fresh_matches_module_and_leaves_training_mode_alone():
    bn = _bn()
    x = torch.randn(2, 5, 4, 3)
    with torch.no_grad():
        want = bn(x)
        got = norm_act_fresh(bn, x.clone())
        assert torch.equal(got, want) and (got >= 0).all()
        bn.train()
        x1 = x.clone()
        norm_act_fresh(bn, x1)                 # training mode: the module itself, input untouched
        assert torch.equal(x1, x)


def test_add_fresh():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        a1 = a.clone()
        assert add_fresh(a1, b).data_ptr() == a1.data_ptr() and torch.equal(a1, a + b)
        a2 = torch.randn(1, 4)
        assert torch.equal(add_fresh(a2, b), a2 + b)        # would need broadcasting into x: out of place
    ag = a.clone().requires_grad_(True)
    assert torch.equal(add_fresh(ag, b).detach(), a + b) and ag.grad is None


def test_batch_norm_fresh_out_of_place_when_the_norm_itself_trains():
    """Frozen input, trainable affine under autograd: must stay differentiable (out of place)."""
    bn = _bn()
    x = torch.randn(2, 5, 4, 3)
    out = batch_norm_fresh(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    out.sum().backward()
    assert bn.weight.grad is not None and out.data_ptr() != x.data_ptr()


def test_hooks_keep_what_they_saw_and_norm_hooks_fire():
    from timm.layers import ConvNormAct
    from zoo.layers.inplace import FreshConvNormAct
    torch.manual_seed(0)
    m = ConvNormAct(3, 4, 3).eval()
    ref = ConvNormAct(3, 4, 3).eval()
    ref.load_state_dict(m.state_dict())
    m.__class__ = FreshConvNormAct
    seen, calls = {}, []
    h1 = m.conv.register_forward_hook(lambda mod, i, o: seen.__setitem__('conv', (o, o.clone())))
    h2 = m.bn.register_forward_hook(lambda mod, i, o: calls.append(1))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out = m(x)
        assert torch.equal(out, ref(x))
    kept, copy = seen['conv']
    assert torch.equal(kept, copy) and calls == [1]
    h1.remove(), h2.remove()
