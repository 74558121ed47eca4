"""TNT / PyramidTNT: equivalence with timm's TNT, a PyramidTNT reference written from the official
code's semantics, checkpoint layouts, any input size, gradients, conventions."""
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.models.transformer_in_transformer import PyramidTnt, Tnt, checkpoint_filter_fn, resample_relative_pos

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timm_pair(variant, **kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(f"tnt_{variant}_patch16_224", **kwargs).eval()
    with torch.device("meta"):  # weights come from ref; skip the init
        ours = timm.create_model(f"tnt_{variant}_patch16_224_zoo", **kwargs).eval()
    return ref, ours


@pytest.mark.parametrize("variant", ["s", "b"])
def test_tnt_matches_timm(variant):
    ref, ours = _timm_pair(variant)
    ours.load_state_dict(checkpoint_filter_fn(dict(ref.state_dict()), ours), assign=True)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-5, diff


# official tnt_pytorch names for timm's (inverse of the filter's renaming, written independently)
_OFFICIAL_TOP = {"patch_pos": "outer_pos", "pixel_pos": "inner_pos", "pixel_embed": "patch_embed",
                 "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2"}
_OFFICIAL_BLOCK = {"norm_in": "inner_norm1", "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2",
                   "mlp_in": "inner_mlp", "norm_out": "outer_norm1", "attn_out": "outer_attn",
                   "norm_mlp": "outer_norm2", "mlp": "outer_mlp", "norm1_proj": "proj_norm1",
                   "norm2_proj": "proj_norm2", "proj": "proj"}


def _official_from_timm(sd):
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "blocks":
            p[2] = _OFFICIAL_BLOCK[p[2]]
        else:
            p[0] = _OFFICIAL_TOP.get(p[0], p[0])
        if p == ["inner_pos"]:
            v = v.flatten(2).transpose(1, 2).contiguous()
        out["module." + ".".join(p)] = v
    out["module.outer_tokens"] = torch.zeros(1, sd["patch_pos"].shape[1] - 1, sd["patch_pos"].shape[2])
    return {"epoch": 300, "state_dict": out}


def test_filter_accepts_official_and_timm_layouts():
    ref, ours = _timm_pair("s", depth=2)
    timm_sd = dict(ref.state_dict())
    a = checkpoint_filter_fn(dict(timm_sd), ours)
    b = checkpoint_filter_fn(_official_from_timm(timm_sd), ours)
    assert set(a) == set(b) == set(ours.state_dict())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ours.load_state_dict(b, assign=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max() <= 1e-5


def test_pretrained_file_in_official_layout(tmp_path):
    """The loading path users take for the official release file (timm unwraps, our filter renames)."""
    ref, _ = _timm_pair("s", depth=2)
    path = tmp_path / "tnt_s_official.pth.tar"
    torch.save(_official_from_timm(dict(ref.state_dict())), path)
    ours = timm.create_model("tnt_s_patch16_224_zoo", depth=2, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max() <= 1e-5


def test_filter_resamples_position_embedding():
    ref, _ = _timm_pair("s", depth=1)
    with torch.device("meta"):
        ours = timm.create_model("tnt_s_patch16_224_zoo", depth=1, img_size=256)
    sd = checkpoint_filter_fn(dict(ref.state_dict()), ours)
    assert sd["outer_pos"].shape == (1, 16 * 16 + 1, 384)
    assert torch.equal(sd["outer_pos"][:, 0], ref.patch_pos[:, 0])
    ours.load_state_dict(sd, assign=True)
    with pytest.raises(ValueError, match="legacy"):
        legacy = timm.create_model("tnt_s_legacy_patch16_224", depth=1)
        checkpoint_filter_fn(dict(legacy.state_dict()), ours)


@pytest.fixture(scope="module")
def tnt_s():
    torch.manual_seed(0)
    return timm.create_model("tnt_s_patch16_224_zoo", num_classes=10).eval()


@pytest.mark.parametrize("size", [224, 256, 320])
def test_tnt_any_input_size(tnt_s, size):
    with torch.no_grad():
        final, inters = tnt_s.forward_intermediates(torch.randn(1, 3, size, size), indices=1)
        out = tnt_s.forward_head(final)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    g = size // 16
    assert inters[0].shape == (1, 384, g, g) and final.shape == (1, g * g + 1, 384)


def test_tnt_pads_to_whole_sentences():
    model = _small("tnt").eval()
    x = torch.randn(1, 3, 36, 30)
    with torch.no_grad():
        out = model(x)
        # the input is zero-padded at the bottom / right to whole 8 px sentences
        torch.testing.assert_close(out, model(F.pad(x, (0, 2, 0, 4))))
        assert model.forward_features(x).shape == (1, 5 * 4 + 1, 32)


@pytest.mark.parametrize("size", [224, 256, 320])
def test_pyramid_any_input_size(size):
    model = timm.create_model("pyramid_tnt_ti", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,expected", [("pyramid_tnt_ti", 10.6), ("pyramid_tnt_s", 32.0),
                                           ("pyramid_tnt_m", 85.0), ("pyramid_tnt_b", 157.0)])
def test_pyramid_param_counts(name, expected):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - expected) <= 0.01 * expected, count


# ---- PyramidTNT reference: the official forward re-stated with plain functional ops ---------------

def _ref_pyramid(sd, x, heads, inner_heads, sr_ratios):
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def cbr(t, p, i, stride):
        t = F.conv2d(t, sd[f"{p}.{i}.weight"], sd[f"{p}.{i}.bias"], stride, 1)
        t = F.batch_norm(t, sd[f"{p}.{i + 1}.running_mean"], sd[f"{p}.{i + 1}.running_var"],
                         sd[f"{p}.{i + 1}.weight"], sd[f"{p}.{i + 1}.bias"], False, 0., 1e-5)
        return F.relu(t)

    def attn(t, p, nh, sr=1, grid=None, bias=None):
        B, N, C = t.shape
        q = F.linear(t, sd[p + "q.weight"]).reshape(B, N, nh, C // nh).transpose(1, 2)
        src = t
        if sr > 1:
            m = F.avg_pool2d(t.transpose(1, 2).reshape(B, C, *grid), sr, sr).flatten(2).transpose(1, 2)
            src = ln(F.linear(m, sd[p + "linear.weight"], sd[p + "linear.bias"]), p + "norm")
        kv = F.linear(src, sd[p + "kv.weight"]).reshape(B, -1, 2, nh, C // nh).permute(2, 0, 3, 1, 4)
        a = q @ kv[0].transpose(-1, -2) * (C // nh) ** -0.5
        if bias is not None:
            a = a + bias
        o = (a.softmax(-1) @ kv[1]).transpose(1, 2).reshape(B, N, C)
        return F.linear(o, sd[p + "proj.weight"], sd[p + "proj.bias"])

    def mlp(t, p):
        return F.linear(F.gelu(F.linear(t, sd[p + "fc1.weight"], sd[p + "fc1.bias"])), sd[p + "fc2.weight"], sd[p + "fc2.bias"])

    B, _, H, W = x.shape
    h = cbr(x, "patch_embed.common_conv", 0, 2)
    words = cbr(h, "patch_embed.inner_convs", 0, 1)
    gh, gw = H // 8, W // 8
    c = words.shape[1]
    words = F.unfold(words, 4, stride=4).transpose(1, 2).reshape(B * gh * gw, c, 16).transpose(1, 2)
    s = cbr(cbr(cbr(h, "patch_embed.outer_convs", 0, 2), "patch_embed.outer_convs", 3, 2), "patch_embed.outer_convs", 6, 1)
    sent = s.flatten(2).transpose(1, 2) + sd["outer_pos"]
    words = words + sd["inner_pos"]
    grid = (gh, gw)
    for i in range(4):
        if i > 0:
            p = f"word_merges.{i - 1}"
            C = words.shape[-1]
            w = ln(words, p + ".norm").reshape(B, grid[0], grid[1], 4, 4, C)
            w = F.pad(w.permute(0, 3, 4, 5, 1, 2), (0, grid[1] % 2, 0, grid[0] % 2)).permute(0, 4, 5, 1, 2, 3)
            top = torch.cat([w[:, 0::2, 0::2], w[:, 1::2, 0::2]], 3)
            bottom = torch.cat([w[:, 0::2, 1::2], w[:, 1::2, 1::2]], 3)
            w = torch.cat([top, bottom], 4).reshape(-1, 8, 8, C).permute(0, 3, 1, 2)
            w = F.conv2d(w, sd[p + ".conv.0.weight"], sd[p + ".conv.0.bias"], 2, 1)
            words = w.reshape(w.shape[0], w.shape[1], 16).transpose(1, 2)
            p = f"sentence_merges.{i - 1}"
            t = ln(sent, p + ".norm").transpose(1, 2).reshape(B, -1, *grid)
            t = F.conv2d(t, sd[p + ".conv.0.weight"], sd[p + ".conv.0.bias"], 2, 1)
            grid = (t.shape[-2], t.shape[-1])
            sent = t.flatten(2).transpose(1, 2)
        rel = sd[f"stages.{i}.relative_pos"]
        j = 0
        while f"stages.{i}.blocks.{j}.outer_norm1.weight" in sd:
            p = f"stages.{i}.blocks.{j}."
            if p + "inner_norm1.weight" in sd:
                BN, M, c = words.shape
                words = words + attn(ln(words.reshape(B, -1, M * c), p + "inner_norm1").reshape(BN, M, c),
                                     p + "inner_attn.", inner_heads[i])
                words = words + mlp(ln(words.reshape(B, -1, M * c), p + "inner_norm2").reshape(BN, M, c), p + "inner_mlp.")
                fold = F.linear(ln(words.reshape(B, -1, M * c), p + "proj_norm1"), sd[p + "proj.weight"])
                sent = sent + ln(fold, p + "proj_norm2")
            sent = sent + attn(ln(sent, p + "outer_norm1"), p + "outer_attn.", heads[i], sr_ratios[i], grid, rel)
            sent = sent + mlp(ln(sent, p + "outer_norm2"), p + "outer_mlp.")
            j += 1
    feat = ln(sent, "norm").mean(1)
    return F.linear(feat, sd["head.fc.weight"], sd["head.fc.bias"])


def _official_pyramid_sd(model):
    sd = {}
    for k, v in model.state_dict().items():
        if "_merges." in k:
            k = k.replace(".conv.", ".conv.0.")
        sd[k] = v
    return sd


@pytest.mark.parametrize("img", [64, 72])  # 72: odd sentence grids (9x9, then 5x5) exercise the padding
def test_pyramid_matches_reference(img):
    cfg = dict(depths=(1, 7, 1, 1), dims=(16, 32, 48, 48), inner_dims=(2, 4, 8, 8), num_heads=(2, 2, 4, 4),
               inner_num_heads=(1, 2, 2, 2), sr_ratios=(4, 2, 1, 1))
    torch.manual_seed(0)
    model = PyramidTnt(img_size=img, num_classes=7, **cfg).eval()
    with torch.no_grad():  # move every parameter / BN statistic off its init value
        for n, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.2 if "running_var" in n else torch.randn_like(t) * 0.1)
    assert model.stages[1].blocks[1].has_inner and not model.stages[1].blocks[2].has_inner
    official = _official_pyramid_sd(model)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        expected = _ref_pyramid(official, x, cfg["num_heads"], cfg["inner_num_heads"], cfg["sr_ratios"])
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the official layout round-trips through the filter
    filtered = checkpoint_filter_fn({"state_dict": official}, model)
    assert set(filtered) == set(model.state_dict())


def test_resample_relative_pos():
    rel = torch.randn(1, 2, 16, 4)
    assert resample_relative_pos(rel, (4, 4), (2, 2), (4, 4), (2, 2)) is rel
    # a bias that depends only on the key is resampled along keys and constant along queries
    key_map = torch.randn(2, 1, 2, 2)
    rel = key_map.flatten(2).unsqueeze(2).expand(2, 1, 16, 4).permute(1, 0, 2, 3)
    out = resample_relative_pos(rel, (6, 6), (3, 3), (4, 4), (2, 2))
    assert out.shape == (1, 2, 36, 9)
    expect = F.interpolate(key_map, size=(3, 3), mode="bicubic", align_corners=False, antialias=True).flatten(1)
    torch.testing.assert_close(out[0], expect.unsqueeze(1).expand(2, 36, 9), rtol=1e-5, atol=1e-5)


def _small(name):
    if name == "tnt":
        return Tnt(img_size=32, patch_size=8, inner_stride=2, embed_dim=32, inner_dim=8, depth=2, num_heads=2,
                   inner_num_heads=2, num_classes=5)
    return PyramidTnt(img_size=64, depths=(1, 7, 1, 1), dims=(16, 32, 32, 32), inner_dims=(4, 4, 8, 8),
                      num_heads=(2, 2, 2, 2), inner_num_heads=(1, 1, 2, 2), num_classes=5)


@pytest.mark.parametrize("name", ["tnt", "pyramid"])
def test_fused_residual_path_matches_dropout_path(name):
    """Training without dropout sums residuals inside the output GEMMs; values and gradients must
    equal the plain residual path (taken when dropout is active)."""
    torch.manual_seed(0)
    model = _small(name).train()
    x = torch.randn(2, 3, 40, 40)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    for m in model.modules():
        if hasattr(m, "has_dropout"):
            m.has_dropout = True  # force the unfused path (dropout modules are all p=0 here)
    out2 = model(x)
    out2.square().mean().backward()
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("onednn", [True, False])
def test_inference_linear_and_residual_match_plain_linear(monkeypatch, onednn):
    """The CPU inference GEMMs (oneDNN with fused GELU / residual, or the in-place fallback) equal
    F.linear (+ GELU, + residual) to fp32 rounding and never write their inputs."""
    import zoo.layers.mha as mha
    if not onednn:
        monkeypatch.setattr(mha, "_ONEDNN_LINEAR", None)
    elif mha._ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear")  # only the fallback exists here
    torch.manual_seed(0)
    x = torch.randn(2, 37, 24)
    lin = torch.nn.Linear(24, 72)
    res = torch.randn(2, 37, 72)
    keep = (x.clone(), res.clone())
    with torch.no_grad():
        assert mha._onednn_ok(x, lin.weight, res) == onednn  # the path under test is the one taken
        for act, ref in [(None, lin(x)), ("gelu", F.gelu(lin(x))), ("gelu_tanh", F.gelu(lin(x), approximate="tanh"))]:
            torch.testing.assert_close(mha.inference_linear(x, lin.weight, lin.bias, act=act), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mha.inference_linear(x, lin.weight, None), F.linear(x, lin.weight), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mha.linear_residual(x, lin, res), res + lin(x), rtol=1e-5, atol=1e-6)
        assert mha.inference_linear(x[:0], lin.weight, lin.bias, act="gelu").shape == (0, 37, 72)
    assert torch.equal(x, keep[0]) and torch.equal(res, keep[1])
    # with a graph recorded it is F.linear + GELU, differentiable
    w = lin.weight.detach().requires_grad_()
    mha.inference_linear(x, w, lin.bias, act="gelu").sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="act='relu' is not supported"):
        mha.inference_linear(x, lin.weight, act="relu")


@pytest.mark.parametrize("name", ["tnt", "pyramid"])
def test_inference_path_matches_autograd_path(name):
    """Under no_grad / inference_mode the blocks take the fused CPU GEMMs; the logits must equal the
    graph-recording forward of the same eval model, and the input must stay untouched."""
    torch.manual_seed(0)
    model = _small(name).eval()
    x = torch.randn(2, 3, 40, 40)
    keep = x.clone()
    ref = model(x.requires_grad_()).detach()
    x = x.detach()
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, keep)


@pytest.mark.parametrize("name", ["tnt", "pyramid"])
def test_fx_trace_runs_the_eager_calls(name):
    """timm's fx check (bitwise equal outputs): the CPU fast-path helpers are fx leaves, so the
    traced model runs the very calls eager runs; training-mode tracing gives gradients."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    model = _small(name).eval()
    x = torch.randn(1, 3, 40, 40)
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=kw)
    with torch.inference_mode():
        assert torch.equal(fx(x)[eval_nodes[-1]], model(x))
    fx.train()
    fx(torch.randn(2, 3, 40, 40))[train_nodes[-1]].mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


@pytest.mark.parametrize("name", ["tnt", "pyramid"])
def test_compile_and_export_never_see_the_onednn_fast_path(name):
    """torch.compile (one graph) and torch.export take the plain GEMMs and match eager, which takes
    the oneDNN ones under no_grad."""
    torch.manual_seed(0)
    model = _small(name).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
        program = torch.export.export(model, (x,))
        exported = program.module()(x)
    assert "mkldnn" not in str(program.graph)
    torch.testing.assert_close(compiled, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported, ref, rtol=1e-5, atol=1e-5)


def test_torchscript_names_the_supported_paths():
    with pytest.raises(zoo.errors.UnsupportedError, match="torch.compile.*torch.export"):
        torch.jit.script(_small("tnt"))


@pytest.mark.parametrize("name", ["tnt", "pyramid"])
def test_grad_checkpointing_and_intermediates(name):
    torch.manual_seed(0)
    model = _small(name).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(inters) == len(model.feature_info)
    for f, info in zip(inters, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-2:] == (math.ceil(48 / info["reduction"]), math.ceil(40 / info["reduction"]))


def test_features_only_and_pruning():
    feats = timm.create_model("pyramid_tnt_ti", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 128, 128))
    assert [o.shape[1:] for o in out] == [(160, 8, 8), (320, 2, 2)]
    model = _small("pyramid")
    assert model.prune_intermediate_layers(indices=(1,)) == [1]
    assert len(model.stages) == 2 and len(model.word_merges) == 1


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least 32x32"):
        _small("pyramid")(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="attn_drop"):
        timm.create_model("tnt_s_patch16_224_zoo", depth=1, attn_drop_rate=1.5)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("tnt_s_patch16_224_zoo", depth=1, global_pool="max")


def test_names_do_not_collide_with_timm():
    ours = zoo.list_models(family="transformer_in_transformer")
    assert set(ours) == {"tnt_s_patch16_224_zoo", "tnt_b_patch16_224_zoo", "pyramid_tnt_ti", "pyramid_tnt_s",
                         "pyramid_tnt_m", "pyramid_tnt_b"}
    cfg = timm.get_pretrained_cfg("tnt_s_patch16_224_zoo.in1k").to_dict()
    assert cfg["hf_hub_id"] == "timm/tnt_s_patch16_224.in1k"
    assert cfg["url"].endswith("/releases/download/tnt/tnt_s_81.5.pth.tar")
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("config", ["tnt_s_in1k.py", "tnt_b_in1k.py", "pyramid_tnt_s_in1k.py", "tnt_digits.py"])
def test_configs_load_and_build(config):
    from mmengine.config import Config
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "transformer_in_transformer", config))
    m = cfg.model
    kwargs = dict(m.get("model_kwargs") or {})
    with torch.device("meta"):
        model = timm.create_model(m.model_name, num_classes=m.num_classes, **kwargs)
    assert model.num_classes == m.num_classes
