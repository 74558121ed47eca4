"""torch.fx symbolic tracing of models that build the op's arguments inside `forward`.

A layout or modifier built from traced values (a parameter's proxy, a traced shape, top-k
indices of an activation) becomes a graph node that rebuilds the validated object on every call
of the traced module; one built from real values stays a constant attribute. Either way the op
is one `call_function` node, and the traced module computes what the eager one does, gradients
included.
"""
import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import zoo.kernels as zk

H, D, P, GRID = 2, 4, 1, (3, 3)
L = P + GRID[0] * GRID[1]


class Mixing(torch.nn.Module):
    """Score mod, head mix and a key-list layout, all built in forward from parameters / activations."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.alpha = torch.nn.Parameter(torch.randn(H, 3, generator=g))
        self.sigma = torch.nn.Parameter(torch.rand(H, 3, generator=g) + 0.5)
        self.mix_pre = torch.nn.Parameter(torch.eye(H) + 0.1 * torch.randn(H, H, generator=g))
        self.mix_post = torch.nn.Parameter(torch.eye(H) + 0.1 * torch.randn(H, H, generator=g))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
        keys = (q @ k.transpose(-1, -2)).detach().topk(6, dim=-1).indices
        layout = zk.key_lists(keys, N)
        sm = zk.GaussianMixture(self.alpha, self.sigma.abs() + 0.1, GRID, num_prefix_tokens=P)
        th = zk.TalkingHeads(self.mix_pre, self.mix_post)
        out = zk.attention(q, k, v, layout, score_mod=sm, head_mix=th)
        return out.transpose(1, 2).reshape(B, N, C)


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_arguments_built_from_traced_values_are_rebuilt_by_the_traced_module():
    torch.manual_seed(0)
    model = Mixing()
    gm = torch.fx.symbolic_trace(model)
    assert len(_nodes(gm, zk.attention)) == 1
    for cls in (zk.KeyListLayout, zk.GaussianMixture, zk.TalkingHeads):
        assert len(_nodes(gm, cls)) == 1, cls
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_zoo_kernels_arg_")]
    x = torch.randn(2, L, H * D)
    torch.testing.assert_close(gm(x), model(x))

    grads = {}
    for name, m in (("eager", model), ("traced", gm)):
        m.zero_grad()
        m(x).square().sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for n in ("alpha", "sigma", "mix_pre", "mix_post", "qkv.weight"):
        assert grads["traced"][n].abs().sum() > 0, n
        torch.testing.assert_close(grads["traced"][n], grads["eager"][n])


def test_rebuilt_objects_are_validated_at_run_time():
    """A causal layout of the traced length follows the input; the fixed mixture grid is checked
    against every call's length, as in eager."""
    class M(torch.nn.Module):
        def __init__(self, mixed=False):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.ones(1, 1))
            self.mixed = mixed

        def forward(self, x):
            q = x.unflatten(-1, (H, D)).transpose(1, 2)
            sm = zk.GaussianMixture(self.alpha, self.alpha * 2, GRID, num_prefix_tokens=P) if self.mixed else None
            return zk.attention(q, q, q, zk.causal(x.shape[1]), score_mod=sm)

    gm = torch.fx.symbolic_trace(M())
    assert len(_nodes(gm, zk.CausalLayout)) == 1
    for n in (5, 12):
        x = torch.randn(2, n, H * D)
        torch.testing.assert_close(gm(x), M()(x))
    mixed = torch.fx.symbolic_trace(M(mixed=True))
    mixed(torch.randn(1, L, H * D))
    with pytest.raises(ValueError, match=r"GaussianMixture: grid \(3, 3\) \+ 1 prefix tokens = 10 tokens"):
        mixed(torch.randn(1, 7, H * D))


def test_arguments_built_from_real_values_stay_constants_and_objects_are_emitted_once():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.nn.Parameter(torch.eye(H))

        def forward(self, x):
            q = x.unflatten(-1, (H, D)).transpose(1, 2)
            layout = zk.causal(L)                           # ints only: a constant
            th = zk.TalkingHeads(self.pre)                  # a traced parameter: rebuilt
            a = zk.attention(q, q, q, layout, head_mix=th)
            return zk.attention(a, q, q, layout, head_mix=th)

    gm = torch.fx.symbolic_trace(M())
    consts = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_zoo_kernels_arg_")]
    assert len(consts) == 2 and all(isinstance(getattr(gm, n.target), zk.CausalLayout) for n in consts)
    assert len(_nodes(gm, zk.TalkingHeads)) == 1 and len(_nodes(gm, zk.attention)) == 2
    x = torch.randn(2, L, H * D)
    torch.testing.assert_close(gm(x), M()(x))


def test_feature_extraction_tracer_and_eager_are_unaffected():
    """torchvision's feature-extraction tracer (the one timm's fx features use) records the
    rebuilt objects as graph nodes; eager construction still validates at once."""
    torch.manual_seed(0)
    model = Mixing().eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert any(n.startswith("gaussian_mixture") for n in eval_nodes)
    fx = create_feature_extractor(model, return_nodes={eval_nodes[-1]: "out"})
    x = torch.randn(2, L, H * D)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)["out"], model(x))
    with pytest.raises(ValueError, match="TalkingHeads: pre must be a square float tensor"):
        zk.TalkingHeads(torch.ones(2, 3))


def test_compile_fullgraph_builds_the_objects_eagerly():
    """Dynamo does not run fx symbolic tracing: construction inside a compiled forward is plain."""
    torch.manual_seed(0)
    model = Mixing()
    x = torch.randn(2, L, H * D)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
