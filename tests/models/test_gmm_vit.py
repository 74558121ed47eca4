"""Gaussian-mixture-masked attention hosts (zoo/models/gmm_vit/, zoo/layers/gmm_attention.py).

The oracles below are written from the paper / reference formula, independently of the modules:
the mixture is built as the reference builds it, alpha · D0 ** (1 / (sigma^2 + 1e-5)) with
D0 = exp(-(dx^2 + dy^2)) ** 0.5, then multiplied into (or added to) explicit softmax logits.
"""
import json
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.layers.gmm_attention import GaussianMixtureMask, GmmAttention
from zoo.models import gmm_vit as G

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_mixture(alpha_kh, sigma_kh, gh, gw):
    """(H, N, N) mixture exactly as the reference computes it; alpha/sigma in its (K, H) layout."""
    n = gh * gw
    i = torch.arange(n, dtype=torch.float64)
    iy, ix = i.div(gw, rounding_mode="floor"), i.remainder(gw)
    d2 = (ix[:, None] - ix[None]) ** 2 + (iy[:, None] - iy[None]) ** 2
    d0 = torch.exp(-d2) ** 0.5
    return (alpha_kh[:, :, None, None] * d0 ** (1 / (sigma_kh[:, :, None, None] ** 2 + 1e-5))).sum(0)


def dense_gmm_attention(attn: GmmAttention, x, grid, prefix=0, mode="mul"):
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    dots = q @ k.transpose(-1, -2) * attn.scale
    m = reference_mixture(attn.gmm.alpha.t(), attn.gmm.sigma.t(), *grid)
    inner = dots[:, :, prefix:, prefix:]
    inner = inner * m if mode == "mul" else inner + m
    dots = torch.cat([dots[:, :, :prefix], torch.cat([dots[:, :, prefix:, :prefix], inner], -1)], 2)
    out = (dots.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)
    return attn.proj(out)


@pytest.mark.parametrize("mode,prefix,grid", [("mul", 0, (4, 5)), ("mul", 1, (3, 3)), ("add", 1, (4, 4))])
def test_score_mod_matches_dense_oracle(mode, prefix, grid):
    torch.manual_seed(0)
    attn = GmmAttention(24, num_heads=3, head_dim=6, num_kernels=4, gmm_mode=mode, num_prefix_tokens=prefix).double()
    with torch.no_grad():  # keep some sigmas small so every Gaussian matters at these distances
        attn.gmm.sigma[:, :2] = torch.tensor([[0.7, 1.5], [1.1, -2.0], [0.9, 3.0]], dtype=torch.float64)
    x = torch.randn(2, prefix + grid[0] * grid[1], 24, dtype=torch.float64, requires_grad=True)
    out = attn(x, grid)
    params = [x, attn.gmm.alpha, attn.gmm.sigma, attn.qkv.weight]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    ref = dense_gmm_attention(attn, x, grid, prefix, mode)
    ref_grads = torch.autograd.grad(ref, params, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b, n in zip(grads, ref_grads, ("x", "alpha", "sigma", "qkv")):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda s, n=n: f"d{n}: {s}")
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0


def test_mixture_init_and_dense_mask():
    torch.manual_seed(0)
    m = GaussianMixtureMask(num_heads=64, num_kernels=50)
    assert abs(m.alpha.mean()) < 0.1 and abs(m.alpha.std() - 2) < 0.1
    assert abs(m.sigma.mean() - 10) < 0.5 and abs(m.sigma.std() - 10) < 0.5
    small = GaussianMixtureMask(3, 5).double()
    torch.testing.assert_close(small.dense((3, 4)), reference_mixture(small.alpha.t(), small.sigma.t(), 3, 4))
    with pytest.raises(ValueError, match="gmm_mode"):
        GaussianMixtureMask(2, 3, mode="pow")
    # no distance table is stored anywhere: only alpha / sigma are state
    model = timm.create_model("gmm_vit_tiny_p4_32", depth=2)
    extra = [k for k in model.state_dict() if "gmm" in k and not k.endswith(("alpha", "sigma"))]
    assert not extra and not [k for k, _ in model.named_buffers()]


def _talking_heads_oracle(attn, x, grid=None, context=None):
    B, Lq, _ = x.shape
    ctx = x if context is None else context
    H, D = attn.num_heads, attn.head_dim
    q = attn.q(x).view(B, Lq, H, D).transpose(1, 2)
    k, v = attn.kv(ctx).view(B, ctx.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
    dots = q @ k.transpose(-1, -2) * attn.scale
    if attn.gmm is not None:
        dots = dots * reference_mixture(attn.gmm.alpha.t(), attn.gmm.sigma.t(), *grid)
    dots = torch.einsum("bhij,hg->bgij", dots, attn.mix_pre).softmax(-1)
    a = torch.einsum("bhij,hg->bgij", dots, attn.mix_post)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, Lq, H * D))


def test_cait_talking_heads_matches_oracle():
    torch.manual_seed(0)
    attn = G.TalkingHeadsAttention(20, num_heads=3, head_dim=5, num_kernels=3).double()
    with torch.no_grad():
        attn.gmm.sigma[:, 0] = torch.tensor([0.8, 1.3, 2.0], dtype=torch.float64)
    x = torch.randn(2, 12, 20, dtype=torch.float64, requires_grad=True)
    params = [x, attn.gmm.alpha, attn.gmm.sigma, attn.mix_pre, attn.mix_post]
    out = attn(x, (3, 4))
    ref = _talking_heads_oracle(attn, x, (3, 4))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    cls_attn = G.TalkingHeadsAttention(20, num_heads=3, head_dim=5).double()  # class attention: 1 query
    cls = torch.randn(2, 1, 20, dtype=torch.float64)
    torch.testing.assert_close(cls_attn(cls, None, x), _talking_heads_oracle(cls_attn, cls, context=x))


def _swin_window_oracle(attn, x, shift):
    """Explicit reference computation: window logits ⊙ GMM, + rel-pos bias, + (-100) shift mask."""
    B, H, W, C = x.shape
    ws, nh, hd = attn.window_size, attn.num_heads, attn.head_dim
    s = ws // 2 if shift else 0
    if s:
        x = torch.roll(x, (-s, -s), (1, 2))
    xw = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
    q, k, v = attn.qkv(xw).view(xw.shape[0], ws * ws, 3, nh, hd).permute(2, 0, 3, 1, 4)
    dots = (q * attn.scale) @ k.transpose(-1, -2)
    dots = dots * reference_mixture(attn.gmm.alpha.t(), attn.gmm.sigma.t(), ws, ws)
    dots = dots + attn._rel_bias(ws)[None]
    if s:
        lab = torch.zeros(H, W)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                lab[hs, wsl] = cnt
                cnt += 1
        lab = lab.view(H // ws, ws, W // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        mask = torch.where(lab[:, None, :] != lab[:, :, None], -100.0, 0.0).to(dots.dtype)
        nW = mask.shape[0]
        dots = (dots.view(B, nW, nh, ws * ws, ws * ws) + mask[None, :, None]).view(-1, nh, ws * ws, ws * ws)
    out = attn.proj((dots.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws * ws, C))
    out = out.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    return torch.roll(out, (s, s), (1, 2)) if s else out


@pytest.mark.parametrize("shift", [False, True])
def test_swin_window_attention_matches_oracle(shift):
    torch.manual_seed(0)
    attn = G.ShiftedWindowAttention(12, num_heads=3, window_size=4, shift=shift, num_kernels=3).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        attn.gmm.sigma[:, 0] = torch.tensor([0.8, 1.3, 2.0], dtype=torch.float64)
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    params = [x, attn.gmm.alpha, attn.gmm.sigma, attn.relative_position_bias_table]
    out, ref = attn(x), _swin_window_oracle(attn, x, shift)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


EXPECTED_PARAMS_M = {  # reference code, 32 px / 100 classes (shared/reference/models_a.md §5c)
    "vit_tiny_p4_32": 2.710, "swin_tiny_p2_32": 7.108, "cait_tiny_p4_32": 5.090, "pit_tiny_p2_32": 7.007,
    "t2t_vit_32": 6.509,
}


@pytest.mark.parametrize("host", sorted(EXPECTED_PARAMS_M))
def test_param_counts(host):
    for name in (f"gmm_{host}", f"{host}_gmmbase"):
        with torch.device("meta"):
            model = timm.create_model(name)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - EXPECTED_PARAMS_M[host]) <= 0.01 * EXPECTED_PARAMS_M[host], (name, n)
        assert model.num_classes == 100 and timm.get_pretrained_cfg(name).input_size == (3, 32, 32)


def test_reference_layout_choices():
    gmm, base = timm.create_model("gmm_vit_tiny_p4_32", depth=1), timm.create_model("vit_tiny_p4_32_gmmbase", depth=1)
    assert gmm.cls_token is None and gmm.global_pool == "avg" and gmm.pos_embed.shape[1] == 64
    assert base.cls_token is not None and base.global_pool == "token" and base.pos_embed.shape[1] == 65
    assert base.blocks[0].attn.gmm is None
    cait = timm.create_model("gmm_cait_tiny_p4_32", depth=2)
    assert cait.blocks[0].attn.gmm is not None and cait.blocks_token_only[0].attn.gmm is None
    pit = timm.create_model("gmm_pit_tiny_p2_32")
    assert all(b.attn.num_prefix_tokens == 1 and b.attn.gmm is not None for s in pit.stages for b in s.blocks)
    t2t = timm.create_model("gmm_t2t_vit_32", depth=1)
    assert t2t.tokens_to_token.token_layers[0].attn.gmm is not None and t2t.blocks[0].attn.gmm is not None
    with pytest.raises(ValueError, match="baseline"):
        timm.create_model("vit_tiny_p4_32_gmmbase", num_kernels=3)


SMALL = {  # reduced depths keep these conformance checks fast; the shared suite runs the full models
    "gmm_vit_tiny_p4_32": dict(depth=3), "vit_tiny_p4_32_gmmbase": dict(depth=3),
    "gmm_swin_tiny_p2_32": dict(depths=(1, 2, 1)), "gmm_cait_tiny_p4_32": dict(depth=3),
    "gmm_pit_tiny_p2_32": dict(depths=(1, 1, 1)), "gmm_t2t_vit_32": dict(depth=3),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_conventions(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1, **SMALL[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)
        model.set_grad_checkpointing(False)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == len(model.feature_info)
        for f, info in zip(inter, model.feature_info):
            assert f.shape[1] == info["num_chs"] and f.shape[-1] == 32 // info["reduction"]
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5)
    model.train()
    model(x).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.get_classifier().out_features == 5
    feats = timm.create_model(name, features_only=True, **SMALL[name]).eval()
    with torch.no_grad():
        fo = feats(x)
    assert len(fo) >= 3 and [f.shape[1] for f in fo] == feats.feature_info.channels()
    with pytest.raises(ValueError, match="in_chans|image batch"):
        model(torch.randn(2, 1, 32, 32))


def test_other_input_sizes():
    """The mixture is evaluated on the actual grid; learned position tables are resampled."""
    for name, size in (("gmm_vit_tiny_p4_32", 48), ("gmm_swin_tiny_p2_32", 64), ("gmm_t2t_vit_32", 48)):
        model = timm.create_model(name, **SMALL[name]).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size)).shape == (1, 100)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        timm.create_model("gmm_vit_tiny_p4_32", depth=1)(torch.randn(1, 3, 30, 30))


class _ReferenceLayoutViT(torch.nn.Module):
    """Mirrors the reference ViT's state-dict layout (written for this test; explicit softmax)."""

    def __init__(self, gmm, depth=2, dim=32, heads=4, dh=8, patch=4, img=16, classes=10, k=5):
        super().__init__()
        n = (img // patch) ** 2
        self.patch, self.heads, self.dh, self.gmm_on, self.grid = patch, heads, dh, gmm, img // patch
        lin = torch.nn.Linear
        self.to_patch_embedding = torch.nn.Sequential(torch.nn.Identity(), lin(3 * patch * patch, dim))
        self.pos_embedding = torch.nn.Parameter(torch.randn(1, n + (0 if gmm else 1), dim))
        if not gmm:
            self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.register_parameter("mask", torch.nn.Parameter(torch.rand(1, 1, n, n), requires_grad=False))
        layers = []
        for _ in range(depth):
            attn = torch.nn.Module()
            attn.norm = torch.nn.LayerNorm(dim)
            attn.fn = torch.nn.Module()
            attn.fn.to_qkv = lin(dim, 3 * heads * dh, bias=False)
            attn.fn.to_out = torch.nn.Sequential(lin(heads * dh, dim))
            if gmm:
                attn.fn.mask = torch.nn.Module()
                attn.fn.mask.sigma = torch.nn.Parameter(torch.randn(k, heads, 1, 1) + 2)
                attn.fn.mask.alpha = torch.nn.Parameter(torch.randn(k, heads, 1, 1))
                attn.fn.mask.mask = torch.nn.Parameter(torch.rand(1, 1, n, n), requires_grad=False)
            ff = torch.nn.Module()
            ff.norm = torch.nn.LayerNorm(dim)
            ff.fn = torch.nn.Module()
            ff.fn.net = torch.nn.Sequential(lin(dim, 2 * dim), torch.nn.GELU(), torch.nn.Identity(), lin(2 * dim, dim))
            layers.append(torch.nn.ModuleList([attn, ff]))
        self.transformer = torch.nn.Module()
        self.transformer.layers = torch.nn.ModuleList(layers)
        self.mlp_head = torch.nn.Sequential(torch.nn.LayerNorm(dim), lin(dim, classes))

    def forward(self, img):
        B, C, Hh, Ww = img.shape
        p = self.patch
        x = img.view(B, C, Hh // p, p, Ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        x = self.to_patch_embedding[1](x)
        if not self.gmm_on:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1)
        x = x + self.pos_embedding
        for attn, ff in self.transformer.layers:
            h = attn.norm(x)
            q, k, v = attn.fn.to_qkv(h).view(B, h.shape[1], 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
            dots = q @ k.transpose(-1, -2) * self.dh ** -0.5
            if self.gmm_on:
                m = reference_mixture(attn.fn.mask.alpha[:, :, 0, 0], attn.fn.mask.sigma[:, :, 0, 0], self.grid,
                                      self.grid).to(dots.dtype)
                dots = dots * m
            x = x + attn.fn.to_out((dots.softmax(-1) @ v).transpose(1, 2).reshape(B, h.shape[1], -1))
            x = x + ff.fn.net(ff.norm(x))
        return self.mlp_head(x.mean(1) if self.gmm_on else x[:, 0])


@pytest.mark.parametrize("gmm", [True, False])
def test_checkpoint_filter_fn_reference_vit(gmm):
    torch.manual_seed(0)
    ref = _ReferenceLayoutViT(gmm).eval()
    name = "gmm_vit_tiny_p4_32" if gmm else "vit_tiny_p4_32_gmmbase"
    model = timm.create_model(name, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, head_dim=8,
                              num_classes=10).eval()
    sd = G.checkpoint_filter_fn(ref.state_dict(), model)
    assert not [k for k in sd if "mask" in k]
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    own = model.state_dict()
    assert G.checkpoint_filter_fn(own, model) is own


OFFICIAL_KEYS = os.path.join(ROOT, "tests", "fixtures", "official_keys")
GMM_MODELS = sorted(timm.list_models(module="gmm_vit"))


def _official_layout(name):
    with open(os.path.join(OFFICIAL_KEYS, f"{name}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", GMM_MODELS)
def test_official_key_layout_loads_strictly(name):
    """The reference code's own state-dict layout (names and shapes, recorded from its models built
    at the pinned commit) maps onto every host with nothing missing, left over or misshapen."""
    layout = _official_layout(name)
    assert layout["source"].startswith("CatworldLee/Gaussian-Mixture-Mask-Attention@b06b199")
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in layout["keys"].items()}
    with torch.device("meta"):  # shapes are all this needs; assign=True puts the given tensors in
        model = timm.create_model(name)
    mapped = G.checkpoint_filter_fn({"model_state_dict": sd}, model)  # as the reference's main.py saves it
    model.load_state_dict(mapped, strict=True, assign=True)
    own = model.state_dict()
    for k, v in mapped.items():  # loaded as given, only rearranged (patch Linear -> conv, (K, H, 1, 1) -> (H, K))
        assert torch.equal(own[k], v), k
    # all that is left out is fixed tables (distance masks, index tables, shift masks) and, for T2T,
    # the sinusoid table, unused cls token and unused tokens_to_token.norm
    fixed = r"(.*\.)?mask|.*\.relative_position_index|.*\.attn_mask"
    unused = r"pos_embed|cls_token|tokens_to_token\.norm\.(weight|bias)" if "t2t" in name else "$^"
    dropped = [k for k in sd if re.fullmatch(fixed, k) or re.fullmatch(unused, k)]
    assert len(mapped) == len(sd) - len(dropped)


def test_official_layout_errors_are_clear():
    model = timm.create_model("gmm_swin_tiny_p2_32", depths=(1, 1, 1))
    sd = {k: torch.zeros(s) for k, s in _official_layout("gmm_swin_tiny_p2_32")["keys"].items()}
    sd["layers.0.blocks.0.attn.lepe.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"layers\.0\.blocks\.0\.attn\.lepe\.weight.*Swin"):
        G.checkpoint_filter_fn(sd, model)
    with pytest.raises(TypeError, match="gmm_vit host"):
        G.checkpoint_filter_fn(sd, torch.nn.Linear(2, 2))


CONFIG_DIR = os.path.join(ROOT, "configs", "gmm_vit")


def test_configs_build():
    from mmengine.config import Config
    files = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
    assert any("digits" in f for f in files) and any("cifar100" in f for f in files)
    built = set()
    for f in files:
        cfg = Config.fromfile(os.path.join(CONFIG_DIR, f))
        m = cfg.model
        assert timm.is_model(m.model_name), f
        assert cfg.test_dataloader.dataset.type == cfg.val_dataloader.dataset.type, f
        key = (m.model_name, m.num_classes)
        if key not in built:
            built.add(key)
            with torch.device("meta"):
                timm.create_model(m.model_name, num_classes=m.num_classes, **(m.get("model_kwargs") or {}))
    recipe = Config.fromfile(os.path.join(CONFIG_DIR, "gmm_vit_tiny_p4_32_cifar100.py"))
    assert recipe.train_cfg.max_epochs == 100 and recipe.optim_wrapper.optimizer.lr == 1e-3
    assert recipe.train_dataloader.batch_size == 128 and recipe.train_dataloader.sampler.repeats == 3
    assert recipe.model.label_smoothing == 0.1 and recipe.model.model_kwargs.drop_path_rate == 0.1


def test_model_card_has_measured_digits_comparison():
    text = open(os.path.join(ROOT, "model_cards", "gmm_vit.md")).read()
    for host in ("vit_tiny_p4_32", "swin_tiny_p2_32", "cait_tiny_p4_32", "pit_tiny_p2_32", "t2t_vit_32"):
        for name in (f"gmm_{host}", f"{host}_gmmbase"):
            row = re.search(rf"\|\s*`?{name}`?(?:\s*\([^|]*\))?\s*\|([^\n]*)", text)
            assert row, f"{name} missing from the digits table"
            assert re.search(r"\d+\.\d", row.group(1)), f"{name}: no measured accuracy"


TINY = {  # one block per stage, narrow: what compile / export see is the same code at any size
    "gmm_vit_tiny_p4_32": dict(depth=1, embed_dim=24, num_heads=2, head_dim=8),
    "vit_tiny_p4_32_gmmbase": dict(depth=1, embed_dim=24, num_heads=2, head_dim=8),
    "gmm_swin_tiny_p2_32": dict(depths=(2,), num_heads=(2,), embed_dim=16),  # a plain and a shifted block
    "gmm_cait_tiny_p4_32": dict(depth=1, depth_token_only=1, embed_dim=24, num_heads=2, head_dim=8, mlp_hidden=32),
    "gmm_pit_tiny_p2_32": dict(depths=(1, 1), num_heads=(2, 2), embed_dim=16),
    "gmm_t2t_vit_32": dict(depth=1, embed_dim=32, num_heads=2, token_dim=8),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_compile_fullgraph_and_export_match_eager(name):
    """torch.compile(fullgraph=True) traces every host without a graph break (forward and backward
    equal eager); torch.export gives a program equal to eager. aot_eager keeps this fast: it runs
    the same Dynamo capture and AOT autograd graphs inductor compiles."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **TINY[name])  # no dropout: train mode is deterministic
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
    model.eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_torchscript_names_the_supported_paths():
    from zoo.errors import UnsupportedError
    for name in ("gmm_vit_tiny_p4_32", "gmm_swin_tiny_p2_32", "gmm_cait_tiny_p4_32", "gmm_pit_tiny_p2_32",
                 "gmm_t2t_vit_32"):
        model = timm.create_model(name, **TINY[name])
        with pytest.raises(UnsupportedError, match=r"torch\.compile.*torch\.export"):
            torch.jit.script(model)
