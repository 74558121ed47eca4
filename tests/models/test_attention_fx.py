"""torch.fx traces of the families that build the op's arguments in forward (GMM-ViT's mixture and
talking heads, Sparsifiner's key lists, FFNet's attention mixer, Puppeteer's causal layout): model
code calls `zoo.kernels.attention` directly, so every attention is the op's own graph node, and the
traced module computes what the eager one does (gradients included)."""
import pytest
import timm
import torch
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import zoo.kernels as zk
from zoo.layers.gmm_attention import GmmAttention
from zoo.models.gmm_vit import TalkingHeadsAttention


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _constants(gm):
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_zoo_kernels_arg_")]


@pytest.mark.parametrize("name, kw, mods", [
    ("gmm_vit_tiny_p4_32", dict(depth=2), (zk.GaussianMixture,)),
    ("gmm_cait_tiny_p4_32", dict(depth=2, depth_token_only=1), (zk.GaussianMixture, zk.TalkingHeads))])
def test_gmm_vit_traces_through_its_score_mod_and_head_mix(name, kw, mods):
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    gm = torch.fx.symbolic_trace(model)
    n_attn = sum(isinstance(m, (GmmAttention, TalkingHeadsAttention)) for m in model.modules())
    assert len(_calls(gm, zk.attention)) == n_attn > 0
    for cls in mods:
        assert _calls(gm, cls), cls                 # rebuilt from the parameters on every call
    assert not _constants(gm)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    grads = []
    for m in (model, gm):
        m.zero_grad()
        m(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if ".gmm." in n or ".mix_" in n})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], g, msg=n)


@pytest.mark.parametrize("name, kw", [("gmm_cait_tiny_p4_32", dict(depth=3, depth_token_only=1)),
                                      ("gmm_pit_tiny_p2_32", dict(depths=(1, 1, 1)))])
def test_gmm_vit_fx_feature_net_matches_eager_intermediates(name, kw):
    """timm's `features_only=True, feature_cls='fx'` (FeatureGraphNet) on the rebuilt score mod /
    head mix (PiT: on grids read from traced shapes): block outputs (tokens) equal the eager
    intermediates (maps)."""
    torch.manual_seed(0)
    net = timm.create_model(name, features_only=True, feature_cls="fx", **kw).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    assert type(net).__name__ == "FeatureGraphNet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net(x)
        want = model.forward_intermediates(x, indices=len(feats), intermediates_only=True)
    assert len(feats) == len(want)
    for f, w in zip(feats, want):
        f = f[:, -w.shape[2] * w.shape[3]:].transpose(1, 2).reshape(w.shape) if f.dim() == 3 else f
        torch.testing.assert_close(f, w)


def test_ffnet_attention_mixer_is_the_ops_node():
    torch.manual_seed(0)
    model = timm.create_model("ffnet_1", token_mixers=("conv", "conv", "attn", "attn")).eval()
    gm = torch.fx.symbolic_trace(model)
    dynamic = [m for m in model.modules() if getattr(m, "dynamic", False)]
    assert len(_calls(gm, zk.attention)) == len(dynamic) > 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_sparsifiner_key_lists_reach_the_op_node():
    """timm's tracer (the predictor and top-k are leaves): each block's op node takes the key-list
    layout that the top-k leaf returns."""
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_deit_tiny_patch16_224", img_size=64, depth=2).eval()
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx = create_feature_extractor(model, return_nodes=[nodes[-1]], tracer_kwargs=kw)
    calls = _calls(fx, zk.attention)
    assert len(calls) == 2
    assert all(c.args[3].op == "call_function" and c.args[3].target.__name__ == "topk_connectivity" for c in calls)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)[nodes[-1]], model(x))


def test_puppeteer_decoder_layer_with_a_traced_causal_layout():
    torch.manual_seed(0)
    layer = timm.create_model("puppeteer_skeleton_small").decoder.layers[0].eval()

    class Causal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, zk.causal(x.shape[1]))[0]

    model = Causal()
    gm = torch.fx.symbolic_trace(model)
    assert len(_calls(gm, zk.attention)) == 1 and len(_calls(gm, zk.CausalLayout)) == 1
    dim = layer.self_attn.q_proj.in_features
    with torch.no_grad():
        for n in (5, 9):            # the layout follows the traced length
            x = torch.randn(2, n, dim)
            torch.testing.assert_close(gm(x), model(x))
