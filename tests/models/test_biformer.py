"""BiFormer: BRA on the routed kernel layout vs a gather-then-softmax oracle, the official
checkpoint key layout, and the timm API pieces (features, intermediates, checkpointing)."""
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401  (registers the models)
from zoo.layers.routing_attention import BiLevelRoutingAttention, LePEAttention, from_regions, to_regions
from zoo.models.biformer import checkpoint_filter_fn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------
# Oracle: the upstream computation written plainly (explicit region slicing, torch.gather of the
# selected K/V regions, masked softmax). Padded keys are masked; rows with no key give 0.
# ------------------------------------------------------------------------------------------------
def _regions(x, n):
    """(B, Hp, Wp, C) -> (B, n*n, S, C), regions in row-major order, tokens row-major inside."""
    B, Hp, Wp, C = x.shape
    rh, rw = Hp // n, Wp // n
    return torch.stack([x[:, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw].reshape(B, rh * rw, C)
                        for i in range(n) for j in range(n)], 1)


def _unregions(r, n, Hp, Wp):
    B, _, _, C = r.shape
    rh, rw = Hp // n, Wp // n
    out = r.new_zeros(B, Hp, Wp, C)
    for i in range(n):
        for j in range(n):
            out[:, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw] = r[:, i * n + j].reshape(B, rh, rw, C)
    return out


def _valid_regions(Hp, Wp, valid_hw, n):
    valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool)
    h, w = valid_hw if valid_hw is not None else (Hp, Wp)
    valid[:, :h, :w] = True
    return _regions(valid, n)  # (1, nR, S, 1)


def oracle_routed(q, k, v, n, heads, idx, scale, valid_hw=None):
    B, Hp, Wp, Cqk = q.shape
    Cv = v.shape[-1]
    qr, kr, vr = _regions(q, n), _regions(k, n), _regions(v, n)
    nR, S, topk = qr.shape[1], qr.shape[2], idx.shape[-1]
    gi = idx[:, :, :, None, None]
    ksel = torch.gather(kr[:, None].expand(B, nR, nR, S, Cqk), 2, gi.expand(B, nR, topk, S, Cqk))
    vsel = torch.gather(vr[:, None].expand(B, nR, nR, S, Cv), 2, gi.expand(B, nR, topk, S, Cv))
    vmask = _valid_regions(Hp, Wp, valid_hw, n)[..., 0].expand(B, nR, S)
    msel = torch.gather(vmask[:, None].expand(B, nR, nR, S), 2, idx[..., None].expand(B, nR, topk, S))
    qh = qr.reshape(B, nR, S, heads, Cqk // heads)
    kh = ksel.reshape(B, nR, topk * S, heads, Cqk // heads)
    vh = vsel.reshape(B, nR, topk * S, heads, Cv // heads)
    logits = torch.einsum("brshd,brthd->brhst", qh * scale, kh)
    logits = logits.masked_fill(~msel.reshape(B, nR, 1, 1, topk * S), float("-inf"))
    attn = torch.softmax(logits, -1).nan_to_num(0.0)
    out = torch.einsum("brhst,brthd->brshd", attn, vh).reshape(B, nR, S, Cv)
    return _unregions(out, n, Hp, Wp)


def oracle_bra(m, x):
    """Full BRA forward of module ``m`` written independently (upstream semantics + masking)."""
    B, H, W, C = x.shape
    n = m.n_win
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).split([m.qk_dim, m.qk_dim, m.dim], -1)
    lepe = F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias,
                    padding=m.lepe.kernel_size[0] // 2, groups=C).permute(0, 2, 3, 1)
    Hp, Wp = math.ceil(H / n) * n, math.ceil(W / n) * n
    pad = (0, 0, 0, Wp - W, 0, Hp - H)
    q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    valid_hw = (H, W) if (Hp, Wp) != (H, W) else None
    vm = _valid_regions(Hp, Wp, valid_hw, n).to(x.dtype)  # (1, nR, S, 1)
    cnt = vm.sum(2)  # (1, nR, 1)
    q_mean = (_regions(q.detach(), n) * vm).sum(2) / cnt
    k_mean = (_regions(k.detach(), n) * vm).sum(2) / cnt
    aff = (q_mean * m.scale) @ k_mean.transpose(-1, -2)
    aff = aff.nan_to_num(0.0).masked_fill(cnt.reshape(1, 1, -1) == 0, float("-inf"))
    idx = aff.topk(m.topk, -1).indices
    out = oracle_routed(q, k, v, n, m.num_heads, idx, m.scale, valid_hw)[:, :H, :W]
    return F.linear(out + lepe, m.proj.weight, m.proj.bias), idx


def _random_routing(B, nR, topk, gen):
    return torch.stack([torch.stack([torch.randperm(nR, generator=gen)[:topk] for _ in range(nR)])
                        for _ in range(B)])


# (H, W, n_win, heads, topk): multiples of the grid, and sizes that need padding (incl. regions
# made of padding only, and maps smaller than the grid).
SIZES = [(14, 14, 7, 2, 4), (12, 9, 3, 2, 2), (10, 13, 4, 1, 3), (5, 6, 7, 2, 16), (8, 8, 2, 4, 1)]


@pytest.mark.parametrize("H,W,n_win,heads,topk", SIZES)
def test_routed_attention_matches_gather_oracle(H, W, n_win, heads, topk):
    """Kernel path (routed_topk layout, region-major tokens) == gather-then-softmax, fwd + bwd,
    for random routing (not the router's choice)."""
    gen = torch.Generator().manual_seed(H * 100 + W)
    torch.manual_seed(H * 100 + W)
    C = 8 * heads
    m = BiLevelRoutingAttention(C, num_heads=heads, n_win=n_win, topk=topk)
    Hp, Wp = math.ceil(H / n_win) * n_win, math.ceil(W / n_win) * n_win
    valid_hw = (H, W) if (Hp, Wp) != (H, W) else None
    B = 2
    pad = (0, 0, 0, Wp - W, 0, Hp - H)
    q0, k0, v0 = [F.pad(torch.randn(B, H, W, C), pad).requires_grad_() for _ in range(3)]
    idx = _random_routing(B, n_win * n_win, m.topk, gen)
    kv_valid = None
    if valid_hw is not None:
        kv_valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool)
        kv_valid[:, :H, :W] = True
        kv_valid = to_regions(kv_valid, n_win, 1).reshape(1, -1)
    out, used = m.routed_attention(*[to_regions(t, n_win, heads) for t in (q0, k0, v0)],
                                   (Hp // n_win) * (Wp // n_win), kv_valid, topk_index=idx)
    out = from_regions(out, n_win, Hp, Wp)
    assert torch.equal(used, idx)
    q1, k1, v1 = [t.detach().clone().requires_grad_() for t in (q0, k0, v0)]
    ref = oracle_routed(q1, k1, v1, n_win, heads, idx, m.scale, valid_hw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    if valid_hw is not None:  # padded query rows are cropped by the layer: no gradient from them
        g[:, H:] = 0
        g[:, :, W:] = 0
    out.backward(g)
    ref.backward(g)
    for a, b in ((q0, q1), (k0, k1), (v0, v1)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("H,W,n_win,heads,topk", SIZES)
def test_bra_layer_matches_oracle(H, W, n_win, heads, topk):
    """Whole layer (routing from region means over valid tokens, LCE on V, proj) vs the oracle."""
    torch.manual_seed(7 + H * W)
    C = 8 * heads
    m = BiLevelRoutingAttention(C, num_heads=heads, n_win=n_win, topk=topk)
    x = torch.randn(2, H, W, C, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    ref, _ = oracle_bra(m, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    gx, *gp = torch.autograd.grad(out, [x, *m.parameters()], g)
    rx, *rp = torch.autograd.grad(ref, [x, *m.parameters()], g)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_routing_ignores_padding():
    """Padding never changes routing or the valid outputs: values in padded positions of q/k/v
    have no effect (region means cover valid tokens only, padded keys are masked)."""
    torch.manual_seed(3)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=2)
    H, W = 7, 8
    valid = torch.zeros(1, 9, 9, 1, dtype=torch.bool)
    valid[:, :H, :W] = True
    kv_valid = to_regions(valid, 3, 1).reshape(1, -1)
    q, k, v = [torch.randn(2, 9, 9, 16) for _ in range(3)]
    out1, idx1 = m.routed_attention(*[to_regions(t, 3, 2) for t in (q, k, v)], 9, kv_valid)
    q2, k2, v2 = [torch.where(valid, t, t + 100 * torch.randn_like(t)) for t in (q, k, v)]
    out2, idx2 = m.routed_attention(*[to_regions(t, 3, 2) for t in (q2, k2, v2)], 9, kv_valid)
    assert torch.equal(idx1, idx2)
    torch.testing.assert_close(from_regions(out1, 3, 9, 9)[:, :H, :W], from_regions(out2, 3, 9, 9)[:, :H, :W])


def test_all_regions_is_dense_attention():
    """Known answer: with top-k = every region, BRA is dense attention over the valid tokens
    (scale over the whole qk width) + LCE, whatever the padding."""
    torch.manual_seed(0)
    C, heads, n = 16, 2, 3
    m = BiLevelRoutingAttention(C, num_heads=heads, n_win=n, topk=n * n)
    x = torch.randn(1, 5, 7, C)
    q, k, v = m.qkv(x).reshape(1, 35, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * C ** -0.5, -1)
    dense = (attn @ v).transpose(1, 2).reshape(1, 5, 7, C)
    lepe = m.lepe(m.qkv(x)[..., 2 * C:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.proj(dense + lepe), atol=1e-5, rtol=1e-4)


def test_lepe_attention_is_dense_mhsa():
    torch.manual_seed(1)
    m = LePEAttention(32, num_heads=8)
    assert m.qkv.bias is None and m.scale == 4 ** -0.5
    x = torch.randn(2, 3, 5, 32)
    q, k, v = m.qkv(x).reshape(2, 15, 3, 8, 4).permute(2, 0, 3, 1, 4)
    o = (torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v).transpose(1, 2).reshape(2, 3, 5, 32)
    o = o + m.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LePE on the input, not on V
    torch.testing.assert_close(m(x), m.proj(o), atol=1e-5, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BiLevelRoutingAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(32, num_heads=2, topk=0)
    with pytest.raises(ValueError, match="topk must be"):
        timm.create_model("biformer_tiny", topks=(1, 4, 0, -2))


# ------------------------------------------------------------------------------------------------
# Model level
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,millions", [
    ("biformer_tiny", 13.14), ("biformer_small", 25.54), ("biformer_base", 56.80), ("biformer_stl", 28.37)])
def test_param_counts(name, millions):
    with torch.device("meta"):
        m = timm.create_model(name)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == millions


def _upstream_state_dict(depths, dims, mlp_ratio, stl=False, in_chans=3, num_classes=1000, gen=None):
    """Keys and shapes of the official checkpoints, from rayleizhu/BiFormer models/biformer.py,
    models/biformer_stl.py, ops/bra_legacy.py and models/_common.py (random values)."""
    shapes = {}

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def conv(prefix, cout, cin, k):
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        shapes[f"{prefix}.bias"] = (cout,)

    def linear(prefix, cout, cin, bias=True):
        shapes[f"{prefix}.weight"] = (cout, cin)
        if bias:
            shapes[f"{prefix}.bias"] = (cout,)

    if stl:
        conv("downsample_layers.0.0", dims[0], in_chans, 4)
        bn("downsample_layers.0.1", dims[0])
    else:
        conv("downsample_layers.0.0", dims[0] // 2, in_chans, 3)
        bn("downsample_layers.0.1", dims[0] // 2)
        conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
        bn("downsample_layers.0.4", dims[0])
    for i in range(1, 4):
        if stl:
            bn(f"downsample_layers.{i}.0", dims[i - 1])
            conv(f"downsample_layers.{i}.1", dims[i], dims[i - 1], 2)
        else:
            conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
            bn(f"downsample_layers.{i}.1", dims[i])
    for i, (d, c) in enumerate(zip(depths, dims)):
        hid = int(mlp_ratio * c)
        for j in range(d):
            p = f"stages.{i}.blocks.{j}" if stl else f"stages.{i}.{j}"
            if not stl:
                shapes[f"{p}.pos_embed.weight"] = (c, 1, 3, 3)
                shapes[f"{p}.pos_embed.bias"] = (c,)
            for nm in ("norm1", "norm2"):
                shapes[f"{p}.{nm}.weight"] = shapes[f"{p}.{nm}.bias"] = (c,)
            shapes[f"{p}.attn.lepe.weight"] = (c, 1, 5, 5)
            shapes[f"{p}.attn.lepe.bias"] = (c,)
            if i < 3:  # BiLevelRoutingAttention: QKVLinear (bias) + wo
                linear(f"{p}.attn.qkv.qkv", 3 * c, c)
                linear(f"{p}.attn.wo", c, c)
            else:  # AttentionLePE: qkv without bias + proj
                linear(f"{p}.attn.qkv", 3 * c, c, bias=False)
                linear(f"{p}.attn.proj", c, c)
            linear(f"{p}.mlp.0", hid, c)
            linear(f"{p}.mlp.2" if stl else f"{p}.mlp.3", c, hid)
    bn("norm", dims[-1])
    linear("head", num_classes, dims[-1])
    gen = gen or torch.Generator().manual_seed(0)
    return {k: (torch.randint(0, 100, s, generator=gen) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=gen)) for k, s in shapes.items()}


@pytest.mark.parametrize("name,depths,dims,mlp_ratio,stl,n_keys", [
    ("biformer_tiny", (2, 2, 8, 2), (64, 128, 256, 512), 3, False, 264),
    ("biformer_stl", (2, 2, 6, 2), (96, 192, 384, 768), 4, True, 201),
])
def test_checkpoint_filter_official_layout(name, depths, dims, mlp_ratio, stl, n_keys):
    sd = _upstream_state_dict(depths, dims, mlp_ratio, stl)
    assert len(sd) == n_keys  # the official tiny checkpoint has 264 tensors
    with torch.device("meta"):  # structure only; strict assign-load fills every tensor
        model = timm.create_model(name)
    mapped = checkpoint_filter_fn({"model": sd}, model)
    model.load_state_dict(mapped, strict=True, assign=True)
    blk = "stages.2.blocks.1" if stl else "stages.2.1"
    qkv = sd[f"{blk}.attn.qkv.qkv.weight"]
    assert torch.equal(model.stages[2].blocks[1].attn.qkv.weight, qkv)
    assert torch.equal(model.stages[2].blocks[1].attn.proj.bias, sd[f"{blk}.attn.wo.bias"])
    fc2 = sd[f"{blk}.mlp.2.weight" if stl else f"{blk}.mlp.3.weight"]
    assert torch.equal(model.stages[2].blocks[1].mlp.fc2.weight, fc2)
    assert torch.equal(model.norm.running_var, sd["norm.running_var"])
    assert torch.equal(model.head.fc.weight, sd["head.weight"])
    down = sd["downsample_layers.3.1.weight" if stl else "downsample_layers.3.0.weight"]
    assert torch.equal(model.stages[3].downsample[1 if stl else 0].weight, down)
    # an already-converted dict passes through unchanged
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


@pytest.mark.parametrize("size", [64, 100])
def test_forward_intermediates_and_features(size):
    torch.manual_seed(0)
    small = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256))
    model = timm.create_model("biformer_tiny", **small).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
        assert [t.shape[1] for t in inter] == [32, 64, 128, 256]
        assert [t.shape[-1] for t in inter] == [math.ceil(size / r) for r in (4, 8, 16, 32)]
        torch.testing.assert_close(final, feats)
        torch.testing.assert_close(model.forward_intermediates(x, norm=True, intermediates_only=True)[-1], feats)
        torch.manual_seed(0)  # same init as `model`
        fmodel = timm.create_model("biformer_tiny", **small, features_only=True, out_indices=(1, 3))
        out = fmodel.eval()(x)
    assert fmodel.feature_info.reduction() == [8, 32]
    torch.testing.assert_close(out[0], inter[1])
    torch.testing.assert_close(out[1], inter[3])


def test_grad_checkpointing_and_all_params_get_grads():
    torch.manual_seed(0)
    model = timm.create_model(
        "biformer_tiny", depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_classes=5, drop_path_rate=0.)
    x = torch.randn(2, 3, 72, 80)
    out = model(x)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out)


def test_configs_build():
    from mmengine.config import Config
    cfg_dir = os.path.join(REPO, "configs", "biformer")
    files = sorted(f for f in os.listdir(cfg_dir) if f.endswith(".py"))
    assert files
    for f in files:
        cfg = Config.fromfile(os.path.join(cfg_dir, f))
        m = cfg.model
        with torch.device("meta"):
            timm.create_model(m.model_name, num_classes=m.num_classes, **(m.get("model_kwargs") or {}))
