"""AGUNet / DAUNet / DAGUNet: known answers of the attention pieces, Keras-semantics rules (pooling,
pyramid, heads, TF-SAME transposed conv), the Keras .h5 converter, and the timm/mmengine surface."""
import importlib.util
import math
import os.path as osp

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.errors import UnsupportedError
from zoo.models.agunet import (AttentionGate3d, AttentionUNet3d, ChannelAttention3d, PositionAttention3d,
                               TFSameConvTranspose3d, keras_to_torch, pool_factors)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY = (4, 8, 16, 32, 32)
NAMES = ["agunet_3d", "daunet_3d", "dagunet_3d", "agunet_3d_small", "daunet_3d_small", "dagunet_3d_small"]


def _tiny(kind="ag", **kw):
    torch.manual_seed(0)
    flags = dict(ag=dict(attention_gates=True), da=dict(attention_gates=False, dual_attention=True),
                 dag=dict(attention_gates=False, dual_attention=True, guided=True))[kind]
    return AttentionUNet3d(filters=TINY, **dict(flags, **kw))


# ------------------------------------------------------------------------------------------------
# attention pieces: known answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["concat", "additive"])
def test_attention_gate_zero_psi_gives_half_skip(mode):
    torch.manual_seed(0)
    ag = AttentionGate3d(6, 5, 3, mode=mode).eval()
    g, x = torch.randn(2, 6, 4, 4, 3), torch.randn(2, 5, 4, 4, 3)
    with torch.no_grad():
        ag.psi_conv.weight.zero_()
        ag.psi_conv.bias.zero_()
        bn = ag.psi_bn
        bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
        torch.testing.assert_close(ag(g, x), 0.5 * x)
        bn.bias.fill_(0.7)  # psi = sigmoid(beta)
        torch.testing.assert_close(ag(g, x), torch.sigmoid(torch.tensor(0.7)) * x)


def test_attention_gate_concat_differs_from_additive():
    torch.manual_seed(0)
    cat = AttentionGate3d(4, 4, 2, mode="concat").eval()
    add = AttentionGate3d(4, 4, 2, mode="additive").eval()
    add.load_state_dict({k: v for k, v in cat.state_dict().items() if not k.startswith("psi_conv")}, strict=False)
    with torch.no_grad():
        add.psi_conv.weight.copy_(cat.psi_conv.weight[:, :2])
        add.psi_conv.bias.copy_(cat.psi_conv.bias)
        cat.psi_conv.weight[:, 2:].copy_(cat.psi_conv.weight[:, :2])  # W_a = W_b: concat gives W(relu g1 + relu x1)
        g, x = torch.randn(1, 4, 3, 3, 3), torch.randn(1, 4, 3, 3, 3)
        g1, x1 = cat.gate_bn(cat.gate_conv(g)), cat.skip_bn(cat.skip_conv(x))
        w = cat.psi_conv.weight[:, :2]
        ref_cat = torch.sigmoid(cat.psi_bn(F.conv3d(F.relu(g1) + F.relu(x1), w, cat.psi_conv.bias)))
        torch.testing.assert_close(cat.gate(g, x), ref_cat)
        ref_add = torch.sigmoid(add.psi_bn(F.conv3d(F.relu(g1 + x1), w, add.psi_conv.bias)))
        torch.testing.assert_close(add.gate(g, x), ref_add)
        assert not torch.allclose(cat.gate(g, x), add.gate(g, x))
    with pytest.raises(ValueError, match="ag_mode"):
        AttentionGate3d(4, 4, 2, mode="sum")


def test_pam_identity_at_gamma_zero_and_dense_oracle():
    torch.manual_seed(0)
    pam = PositionAttention3d(16)
    x = torch.randn(2, 16, 4, 4, 4)  # N = 64 tokens
    torch.testing.assert_close(pam(x), x)
    with torch.no_grad():
        pam.gamma.fill_(1.0)
        y = pam(x)
    X = x.flatten(2).transpose(1, 2).double()  # (B, N, C)
    q = X @ pam.query.weight.double().flatten(1).T
    k = X @ pam.key.weight.double().flatten(1).T
    v = X @ pam.value.weight.double().flatten(1).T
    att = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # scale 1.0, as upstream
    ref = (att @ v).transpose(1, 2).reshape(x.shape) + x.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    # 8 pseudo-heads sharing q/k with C/8-wide value slices give the same output
    vh = v.reshape(2, 64, 8, 2).permute(0, 2, 1, 3)
    ph = (att[:, None] @ vh).permute(0, 2, 1, 3).reshape(2, 64, 16)
    torch.testing.assert_close(ph, att @ v)
    # gradient reaches the projections once gamma != 0
    pam(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pam.parameters())


def test_pam_frozen_projections_and_errors():
    pam = PositionAttention3d(16, projections="frozen")
    assert [n for n, p in pam.named_parameters() if p.requires_grad] == ["gamma"]
    with pytest.raises(ValueError, match="pam_projections"):
        PositionAttention3d(16, projections="random")
    with pytest.raises(ValueError, match="at least 8 channels"):
        PositionAttention3d(4)


def test_cam_keras_matches_numpy_and_differs_from_danet():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 3, 2) * 0.3
    keras, danet = ChannelAttention3d("keras"), ChannelAttention3d("danet")
    torch.testing.assert_close(keras(x), x)  # gamma = 0
    with torch.no_grad():
        keras.gamma.fill_(1.0), danet.gamma.fill_(1.0)
        yk, yd = keras(x), danet(x)
    for b in range(2):
        X = x[b].reshape(6, -1).T.double().numpy()  # (N, C), channels-last like Keras
        E = X.T @ X
        S = np.exp(E - E.max(1, keepdims=True))
        S /= S.sum(1, keepdims=True)
        ref_k = X @ S + X
        np.testing.assert_allclose(yk[b].reshape(6, -1).T.double().numpy(), ref_k, rtol=1e-4, atol=1e-5)
        A = X.T  # (C, N), DANet: softmax(max(E) - E) A
        En = E.max(1, keepdims=True) - E
        P = np.exp(En - En.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        ref_d = P @ A + A
        np.testing.assert_allclose(yd[b].reshape(6, -1).double().numpy(), ref_d, rtol=1e-4, atol=1e-5)
        # the Keras form is the *transposed* probability matrix, not row-softmax attention over channels
        assert not np.allclose((S @ A + A), ref_k.T, atol=1e-3)
    assert not torch.allclose(yk, yd, atol=1e-3)
    with pytest.raises(ValueError, match="cam_mode"):
        ChannelAttention3d("fu")


# ------------------------------------------------------------------------------------------------
# Keras rules: pooling, pyramid, heads, softmax, transposed conv
# ------------------------------------------------------------------------------------------------
def test_pooling_rule_and_pyramid_sizes():
    assert pool_factors((32, 5, 4)) == (2, 2, 1) and pool_factors((3, 4, 9)) == (1, 1, 2)
    model = _tiny("ag").eval()
    seen = []
    for st in model.stages[1:]:
        st.pyramid_conv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    x = torch.randn(1, 1, 32, 32, 24)
    with torch.no_grad():
        skips, factors, bottom = model.encode(x)
    # level inputs 32x32x24 -> 16x16x12 -> 8x8x6 -> 4x4x3: the last level pools nothing (4 <= 4, 3 <= 4)
    assert [tuple(s.shape[2:]) for s in skips] == [(32, 32, 24), (16, 16, 12), (8, 8, 6), (4, 4, 3)]
    assert factors == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert tuple(bottom.shape) == (1, 32, 4, 4, 3)
    assert seen == [(16, 16, 12), (8, 8, 6), (4, 4, 3)]  # average-pooled input at each level >= 1
    assert [s.shape[1] for s in skips] == list(TINY[:4])


@pytest.mark.parametrize("kind", ["ag", "da", "dag"])
def test_heads_finest_first_softmax_and_shapes(kind):
    model = _tiny(kind).train()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        outs = model(x)
    assert isinstance(outs, list) and len(outs) == 4
    # 16x16x8 -> 8x8x4 -> 4x4x4 (z stops at 4) -> 4x4x4: finest head first
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16, 8), (8, 8, 4), (4, 4, 4), (4, 4, 4)]
    assert [h.in_channels for h in model.heads] == list(TINY[:4])
    model.eval()
    with torch.no_grad():
        single = model(x)
        prob = model.predict_proba(x)
        assert single.shape == (1, 2, 16, 16, 8)
        torch.testing.assert_close(prob.sum(1), torch.ones(1, 16, 16, 8))
        torch.testing.assert_close(model.forward_all(x)[0], single)
    if kind == "ag":
        no_ds = _tiny(kind, deep_supervision=False).train()
        with torch.no_grad():
            assert len(no_ds.heads) == 1 and no_ds(x).shape == (1, 2, 16, 16, 8)


def _tf_same_conv_adjoint(u, w, stride):
    """numpy: TF SAME cross-correlation of u (Cout, L1, L2, L3), L = n*s, with the ConvTranspose
    weight w (Cin, Cout, k, k, k) read as a conv Cout -> Cin: the map whose adjoint TF's
    Conv3DTranspose(padding='same') is."""
    k = w.shape[-1]
    n = [L // s for L, s in zip(u.shape[1:], stride)]
    pads = [max(k - s, 0) for s in stride]
    up = np.pad(u, [(0, 0)] + [(p // 2, p - p // 2 + k) for p in pads])
    out = np.zeros((w.shape[0],) + tuple(n))
    for t in np.ndindex(k, k, k):
        sl = tuple(slice(t[a], t[a] + n[a] * stride[a], stride[a]) for a in range(3))
        out += np.einsum("io,oxyz->ixyz", w[(slice(None), slice(None)) + t], up[(slice(None),) + sl])
    return out


@pytest.mark.parametrize("stride", [(2, 2, 2), (1, 1, 1), (2, 2, 1), (4, 4, 4), (8, 2, 1)])
def test_transposed_conv_tf_same_crop_rule(stride):
    torch.manual_seed(0)
    ct = TFSameConvTranspose3d(3, 2, 3, bias=False)
    x = torch.randn(1, 3, 3, 4, 2, dtype=torch.float64)
    with torch.no_grad():
        y = ct.double()(x, stride)[0].numpy()
    assert y.shape == (2, 3 * stride[0], 4 * stride[1], 2 * stride[2])
    rng = np.random.RandomState(0)
    u = rng.randn(*y.shape)
    # adjoint identity <x, A u> = <ConvT x, u>
    lhs = float((x[0].numpy() * _tf_same_conv_adjoint(u, ct.weight.detach().numpy(), stride)).sum())
    assert math.isclose(lhs, float((y * u).sum()), rel_tol=1e-9, abs_tol=1e-9)
    if stride == (2, 2, 2):  # torch's "same-size" padding is shifted by one voxel against TF
        ref = F.conv_transpose3d(x, ct.weight.detach(), stride=2, padding=1, output_padding=1)[0].numpy()
        assert ref.shape == y.shape and not np.allclose(ref, y)


def test_guided_decoder_up_projection_strides():
    model = _tiny("dag").eval()
    seen = []
    for dec in model.decoders:
        dec.guide_up.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape[2:]), tuple(o.shape[2:]))))
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32, 16))
    # bottom 4x4x4 (z stopped pooling at 4): up-projected by 1, 2, 4, 8 in x/y and 1, 1, 2, 4 in z
    assert seen == [((4, 4, 4), (4, 4, 4)), ((4, 4, 4), (8, 8, 4)), ((4, 4, 4), (16, 16, 8)),
                    ((4, 4, 4), (32, 32, 16))]
    assert model.decoders[0].bn.num_features == 3 * TINY[3]


def test_input_errors():
    model = _tiny("ag")
    with pytest.raises(ValueError, match="odd size 9"):
        model(torch.randn(1, 1, 16, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, 1, D1, D2, D3\)"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="global_pool"):
        AttentionUNet3d(filters=TINY, global_pool="avg")
    with pytest.raises(ValueError, match="dual_attention"):
        AttentionUNet3d(filters=TINY, attention_gates=False, guided=True)


# ------------------------------------------------------------------------------------------------
# timm surface
# ------------------------------------------------------------------------------------------------
def test_registered_names_and_cfgs():
    assert set(NAMES) <= set(zoo.list_models(family="agunet"))
    for n in NAMES:
        cfg = timm.get_pretrained_cfg(n).to_dict()
        assert cfg["num_classes"] == 2 and cfg["input_size"][0] == 1 and len(cfg["input_size"]) == 4
        assert cfg["test_input_size"] == cfg["input_size"]
        assert not {"mean", "std", "interpolation", "crop_pct", "crop_mode"} & set(cfg)  # no 2-D image fields
        assert cfg["paper_ids"] == "arXiv:2101.07715" and cfg["license"] and cfg["origin_url"]
    m = timm.create_model("dagunet_3d_small", num_classes=3)
    sd = m.state_dict()
    assert "stages.0.conv_block.0.conv.weight" in sd and all(f"{c}.weight" in sd for c in
                                                               timm.get_pretrained_cfg("dagunet_3d_small").classifier)


@pytest.mark.parametrize("kind", ["ag", "dag"])
def test_backward_all_params_and_grad_checkpointing(kind):
    model = _tiny(kind, attn_drop_rate=0.0).train()
    x = torch.randn(2, 1, 8, 8, 8)
    outs = model(x)
    sum(o.float().mean() for o in outs).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
    model.train()
    y = model(x.requires_grad_(True))
    sum(o.mean() for o in y).backward()
    assert x.grad is not None


def test_classifier_api_and_intermediates():
    model = _tiny("da").eval()
    x = torch.randn(1, 1, 8, 8, 8)
    assert model.get_classifier() is model.heads[0] and model.num_features == TINY[0]
    assert model.no_weight_decay() == {"dual.pam.gamma", "dual.cam.gamma"}
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in inters] == [i["num_chs"] for i in model.feature_info]
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        model.reset_classifier(5)
        assert model(x).shape == (1, 5, 8, 8, 8)
    with pytest.raises(UnsupportedError, match="global pooling"):
        model.reset_classifier(2, "avg")
    model.reset_classifier(0)  # timm's meaning: no head, the model returns its features
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))
    assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)


# ------------------------------------------------------------------------------------------------
# Keras .h5 converter
# ------------------------------------------------------------------------------------------------
def _convert_tool():
    spec = importlib.util.spec_from_file_location("convert_keras_agunet", osp.join(ROOT, "tools", "convert_keras_agunet.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _keras_weights(kind, torch_mod, rng):
    """Random weights in Keras shapes for one layer (shapes read off the torch module)."""
    if kind == "Conv3D":
        o, i, *k = torch_mod.weight.shape
        w = dict(kernel=rng.randn(*k, i, o).astype(np.float32))
        if torch_mod.bias is not None:
            w["bias"] = rng.randn(o).astype(np.float32)
        return w
    if kind == "Conv3DTranspose":
        i, o, *k = torch_mod.weight.shape
        return dict(kernel=rng.randn(*k, o, i).astype(np.float32), bias=rng.randn(o).astype(np.float32))
    if kind == "BatchNormalization":
        c = torch_mod.num_features
        return dict(gamma=rng.rand(c).astype(np.float32) + 0.5, beta=rng.randn(c).astype(np.float32),
                    moving_mean=rng.randn(c).astype(np.float32), moving_variance=rng.rand(c).astype(np.float32) + 0.5)
    return dict(gamma=rng.randn(1).astype(np.float32))


_KERAS_BASE = dict(Conv3D="conv3d", Conv3DTranspose="conv3d_transpose", BatchNormalization="batch_normalization",
                   PAM="pam", CAM="cam")


def _write_keras_h5(path, model, rng, untracked_pam_convs=True):
    """An h5 laid out like a Keras 2 / tf.keras 1.x full-model save: model_weights/<name>/<name>/<w>:0,
    auto-generated names numbered in creation order, ``layer_names`` in a different (graph) order."""
    import h5py

    counters, layers = {}, []

    def name(kind):
        n = counters.get(kind, 0)
        counters[kind] = n + 1
        return _KERAS_BASE[kind] if n == 0 else f"{_KERAS_BASE[kind]}_{n}"

    mods = dict(model.named_modules())
    for kind, p in model.keras_layers():
        lname = name(kind)
        layers.append((lname, kind, _keras_weights(kind, mods[p], rng), p))
        if kind == "PAM" and untracked_pam_convs:  # the 3 convs PAM.call() creates consume names, no weights
            for _ in range(3):
                name("Conv3D")
    order = list(range(len(layers)))
    rng.shuffle(order)
    with h5py.File(path, "w") as f:
        g = f.create_group("model_weights")
        names = [layers[i][0] for i in order] + ["activation_3", "max_pooling3d_1"]
        g.attrs["layer_names"] = np.array([n.encode() for n in names])
        for lname, kind, w, _ in layers:
            lg = g.create_group(lname)
            lg.attrs["weight_names"] = np.array([f"{lname}/{k}:0".encode() for k in w])
            inner = lg.create_group(lname)
            for k, v in w.items():
                inner.create_dataset(f"{k}:0", data=v)
        for extra in ("activation_3", "max_pooling3d_1"):
            g.create_group(extra).attrs["weight_names"] = np.array([], dtype="S1")
    return layers


@pytest.mark.parametrize("kind", ["ag", "dag"])
def test_keras_h5_converter_round_trip(kind, tmp_path):
    pytest.importorskip("h5py")  # optional dependency ([medical] extra); installed in CI
    from safetensors.torch import load_file

    tool = _convert_tool()
    flags = dict(filters=TINY)
    name = "agunet_3d_small" if kind == "ag" else "dagunet_3d_small"
    torch.manual_seed(0)
    ref_model = timm.create_model(name, **flags)
    layers = _write_keras_h5(str(tmp_path / "model.h5"), ref_model, np.random.RandomState(0))
    logs = []
    model = tool.convert(str(tmp_path / "model.h5"), name, str(tmp_path / "out.safetensors"), log=logs.append, **flags)
    sd = load_file(str(tmp_path / "out.safetensors"))
    for lname, lkind, w, path in layers:
        for k, v in keras_to_torch(lkind, w).items():
            torch.testing.assert_close(sd[f"{path}.{k}"], v, rtol=0, atol=0)
    assert any("PAM projection" in m for m in logs) == (kind == "dag")
    # a Keras Conv3D (channels-last correlation) and the converted torch conv agree at a voxel
    lname, lkind, w, path = next(entry for entry in layers if entry[3] == "stages.1.conv_block.0.conv")
    conv = dict(model.named_modules())[path]
    xin = torch.randn(1, conv.in_channels, 5, 5, 5)
    with torch.no_grad():
        y = conv(xin)[0, :, 2, 2, 2].numpy()
    patch = xin[0, :, 1:4, 1:4, 1:4].permute(1, 2, 3, 0).numpy()  # (3, 3, 3, in), channels-last
    np.testing.assert_allclose(y, np.einsum("abci,abcio->o", patch, w["kernel"]) + w["bias"], rtol=1e-4, atol=1e-4)
    # the safetensors file loads through timm's pretrained path
    m2 = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "out.safetensors")),
                           **flags)
    torch.testing.assert_close(m2.state_dict()["heads.0.weight"], sd["heads.0.weight"])


def test_keras_h5_converter_rejects_wrong_architecture(tmp_path):
    pytest.importorskip("h5py")
    tool = _convert_tool()
    _write_keras_h5(str(tmp_path / "m.h5"), timm.create_model("agunet_3d_small", filters=TINY),
                    np.random.RandomState(0))
    with pytest.raises(tool.ConversionError, match="layer counts differ"):
        tool.convert(str(tmp_path / "m.h5"), "agunet_3d_small", str(tmp_path / "o.safetensors"),
                     filters=TINY, input_pyramid=False)
    with pytest.raises(tool.ConversionError, match="shape"):
        tool.convert(str(tmp_path / "m.h5"), "agunet_3d_small", str(tmp_path / "o.safetensors"),
                     filters=(4, 8, 16, 32, 64))


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
def test_configs_load_and_build():
    import glob

    from mmengine.config import Config

    files = sorted(glob.glob(osp.join(ROOT, "configs", "agunet", "*.py")))
    assert files
    for f in files:
        cfg = Config.fromfile(f)
        m = cfg.model
        model = timm.create_model(m.model_name, num_classes=m.num_classes, **(m.get("model_kwargs") or {}))
        assert isinstance(model, AttentionUNet3d)


# ------------------------------------------------------------------------------------------------
# timm generic calls, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------
def test_data_config_raises_documented_error():
    """The cfg gives the volume size (C, D1, D2, D3); timm's 2-D image data config is refused with
    the documented error naming the 3-D pipeline, never filled with ImageNet defaults."""
    from timm.data import resolve_data_config, resolve_model_data_config

    m = timm.create_model("agunet_3d_small")
    assert m.pretrained_cfg["input_size"] == (1, 32, 32, 32)
    assert timm.create_model("dagunet_3d").pretrained_cfg["input_size"] == (1, 128, 128, 144)
    for call in (lambda: resolve_data_config({}, model=m), lambda: resolve_model_data_config(m),
                 lambda: resolve_data_config({}, model=timm.create_model("daunet_3d_small", features_only=True))):
        with pytest.raises(UnsupportedError, match="zoo.tasks.seg3d"):
            call()
    with pytest.raises(UnsupportedError, match="torch.compile"):
        torch.jit.script(m)


def test_features_only_encoder_maps():
    """features_only: the encoder's pre-pool maps and the attended bottleneck (``feature_info``),
    the same tensors as forward_intermediates; axes of size <= 4 stop pooling."""
    m = _tiny("dag").eval()
    feats = timm.create_model("dagunet_3d_small", filters=TINY, features_only=True).eval()
    feats.model.load_state_dict(m.state_dict())
    assert feats.feature_info.channels() == list(TINY) and feats.feature_info.reduction() == [1, 2, 4, 8, 16]
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        maps = feats(x)
        expect = m.forward_intermediates(x, intermediates_only=True)
    sizes = [(16, 16, 32), (8, 8, 16), (4, 4, 8), (4, 4, 4), (4, 4, 4)]
    assert [tuple(t.shape) for t in maps] == [(1, c, *s) for c, s in zip(TINY, sizes)]
    for a, b in zip(maps, expect):
        torch.testing.assert_close(a, b)
    two = timm.create_model("agunet_3d_small", features_only=True, out_indices=(0, 4))
    assert two.feature_info.channels() == [8, 64] and len(two(torch.randn(1, 1, 16, 16, 16))) == 2


def _loss(out):
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ag", "dag"])
def test_torch_compile_fullgraph_matches_eager(kind):
    """fullgraph=True (0 graph breaks), eval and train (deep-supervision list) with a backward:
    outputs and parameter gradients equal eager's."""
    m = _tiny(kind, attn_drop_rate=0.0)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 8, 8, 16)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
    m.train()
    res = []
    for fn in (m, compiled):
        m.zero_grad()
        out = fn(x)
        _loss(out).backward()
        res.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (oe, ge), (oc, gc) = res
    assert isinstance(oc, list) and len(oc) == len(oe) == len(TINY) - 1
    for a, b in zip(oc, oe):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ge.keys() == gc.keys() == {n for n, _ in m.named_parameters()}
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torch_export_matches_eager():
    m = _tiny("dag").eval()
    x = torch.randn(1, 1, 8, 8, 16)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-4, atol=1e-5)
