"""Sparsifiner: timm-equivalence at keep 1.0, connectivity mask, kernel path vs masked dense
attention, predictor math, any-size token projections, checkpoint filtering, recipe losses."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.kernels import attention
from zoo.layers.connectivity import ConnectivityPredictor, keep_count, resample_token_proj, topk_connectivity
from zoo.models.sparsifiner import Sparsifiner, checkpoint_filter_fn

ROOT = Path(__file__).resolve().parents[2]


def _tiny(**kw):
    args = dict(img_size=64, patch_size=8, depth=2, num_classes=7)
    args.update(kw)
    return timm.create_model("sparsifiner_deit_tiny_patch16_224", **args)


def _masked_dense(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_keep_rate_one_equals_timm_deit_small():
    torch.manual_seed(0)
    ref = timm.create_model("deit_small_patch16_224").eval()
    model = timm.create_model("sparsifiner_deit_small_patch16_224", keep_rate=1.0, weight_init="skip").eval()
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out, want = model(x), ref(x)
        assert (out - want).abs().max().item() <= 1e-5
        # the predictors are real: at 0.25 the output moves
        model.set_keep_rate(0.25)
        assert (model(x) - want).abs().max().item() > 1e-4
    assert sum(p.numel() for p in model.parameters()) == 22_251_880   # DeiT-S 22.05 M + 12 predictors


@pytest.mark.parametrize("img,keep", [(224, 0.25), (96, 0.25), (64, 0.4)])
def test_mask_counts_and_dense_cls_row(img, keep):
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_deit_tiny_patch16_224", depth=1, num_classes=0, keep_rate=keep).eval()
    with torch.no_grad():
        layer = model.forward_aux(torch.randn(2, 3, img, img))["layers"][0]
    mask = layer["connectivity"].to_dense_mask()
    N = 1 + (img // 16) ** 2
    assert mask.shape == (2, 3, N, N) and mask.dtype == torch.bool and not mask.requires_grad
    assert mask[:, :, 0].all()
    assert (mask[:, :, 1:].sum(-1) == math.ceil(keep * N)).all()
    # the mask is the top-k of the approximation
    approx = layer["approx_attn"]
    kth = approx.topk(math.ceil(keep * N), -1).values[..., -1:]
    assert (approx[mask[:, :, 1:]] >= kth.expand_as(approx)[mask[:, :, 1:]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_nonnegative_topk_on_bit_patterns_selects_the_same_keys(dtype):
    """Non-negative floats order like their bit patterns read as integers: the fast selection keeps
    exactly the keys of a float top-k (distinct scores, zeros included)."""
    g = torch.Generator().manual_seed(0)
    N = 37
    approx = torch.rand(2, 3, N - 1, N, generator=g, dtype=torch.float64).argsort(-1).to(dtype)   # distinct 0..N-1
    approx[0, 0, 0] *= 1e-3                         # tiny and subnormal-free scales still order exactly
    fast = topk_connectivity(approx, 0.3, nonnegative=True).to_dense_mask()
    slow = topk_connectivity(approx, 0.3).to_dense_mask()
    assert torch.equal(fast, slow) and (fast[:, :, 1:].sum(-1) == math.ceil(0.3 * N)).all()
    model_approx = _tiny().eval().blocks[0].attn.mask_predictor(*(torch.randn(2, 3, 65, 64),) * 2)
    assert (model_approx >= 0).all()                # what the model's call relies on


def test_kernel_path_equals_masked_dense_forward_backward():
    torch.manual_seed(0)
    B, H, N, D = 2, 3, 50, 16
    q, k, v = [torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    conn = topk_connectivity(torch.randn(B, H, N - 1, N, dtype=torch.float64), 0.25)
    mask = conn.to_dense_mask()
    scale = D ** -0.5
    out = attention(q, k, v, conn, scale=scale)
    want = _masked_dense(q, k, v, mask, scale)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    gs = torch.autograd.grad(out, (q, k, v), g)
    gw = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(gs, gw):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_attention_module_matches_masked_dense_and_timm_with_full_mask():
    torch.manual_seed(0)
    model = _tiny().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 65, 192)
    with torch.no_grad():
        out, aux = attn.forward_aux(x)
        q, k, v = attn._qkv(x)
        want = attn.proj(_masked_dense(q, k, v, aux["connectivity"].to_dense_mask(), attn.scale).transpose(1, 2).reshape(2, 65, 192))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x), out)


def test_predictor_known_answer():
    torch.manual_seed(0)
    pred = ConnectivityPredictor(16, 2, (4, 4), reduce_c_factor=2, reduce_n_factor=6, coef_topk=2)
    assert pred.proj_n.shape == (17, 2) and pred.proj_c_q.out_features == 8
    with torch.no_grad():
        pred.proj_back_n.copy_(torch.randn(17, 2) * 0.05)
    q, k = torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 16)
    qc, kc = pred.proj_c_q(q), pred.proj_c_k(k)
    coef = ((qc @ (kc.transpose(-1, -2) @ pred.proj_n)) * 2 ** -0.5).softmax(-1)[:, :, 1:]
    basis = pred.proj_back_n.abs().t()
    basis = torch.where(basis > 0.02, basis, torch.zeros_like(basis))
    torch.testing.assert_close(pred(q, k), coef @ basis)           # rank 2 = top-2: coef kept whole
    torch.testing.assert_close(pred(q, k, recon=True), coef @ pred.proj_back_n.t())
    pred.coef_topk = 1
    top = coef * (coef == coef.amax(-1, keepdim=True))
    torch.testing.assert_close(pred(q, k), top @ basis)


def test_token_projection_resampling():
    w = torch.randn(1 + 16, 3)
    assert resample_token_proj(w, 17, 1, (4, 4)) is w
    r = resample_token_proj(w, 1 + 64, 1, (4, 4), rescale=True)
    assert r.shape == (65, 3)
    torch.testing.assert_close(r[0], w[0])
    # a constant map stays constant (times the count ratio when rescaled)
    c = torch.ones(17, 3)
    torch.testing.assert_close(resample_token_proj(c, 65, 1, (4, 4), rescale=True)[1:], torch.full((64, 3), 0.25))
    assert resample_token_proj(w, 1 + 12, 1, (4, 4)).shape == (13, 3)    # no square grid: 1-D


def test_checkpoint_filter_upstream_layout_any_size():
    """An upstream-style checkpoint (under 'model', predictors at 197 tokens) loads at 96 px."""
    torch.manual_seed(0)
    src = timm.create_model("sparsifiner_deit_tiny_patch16_224", depth=2).eval()
    sd = {"model": {k: v.clone() for k, v in src.state_dict().items()}}
    with pytest.raises(ValueError, match="predictor_rank=32"):
        checkpoint_filter_fn(sd, timm.create_model("sparsifiner_deit_tiny_patch16_224", depth=1, img_size=96))
    dst = timm.create_model("sparsifiner_deit_tiny_patch16_224", depth=2, img_size=96, predictor_rank=32)
    dst.load_state_dict(checkpoint_filter_fn(sd, dst))
    for k in ("blocks.0.attn.qkv.weight", "blocks.1.attn.mask_predictor.proj_c_q.weight"):
        torch.testing.assert_close(dst.state_dict()[k], src.state_dict()[k])
    assert dst.blocks[0].attn.mask_predictor.proj_n.shape == (37, 32)
    # resampled on the fly vs resampled in the checkpoint: the same predictor
    x = torch.randn(1, 3, 96, 96)
    dst.eval()
    with torch.no_grad():
        a = src.forward_aux(x)["layers"][1]["approx_attn"]
        b = dst.forward_aux(x)["layers"][1]["approx_attn"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_budget_not_stateful_and_modes():
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y1 = model(x)
        model(torch.randn(1, 3, 32, 32))       # a smaller input must not shrink the budget
        torch.testing.assert_close(model(x), y1)
    assert all(a.keep_rate == 0.25 for a in model.attn_modules())
    # sparse mode: predictors frozen, backbone trains
    model.train()
    model(x).sum().backward()
    assert not any(p.requires_grad for m in model.predictors() for p in m.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # recon mode: predictors get gradients from the reconstruction
    model.zero_grad()
    model.set_attn_mode("recon")
    out = model.forward_aux(x)
    sum(((l["approx_attn"] - l["attn"]) ** 2).sum() for l in out["layers"]).backward()
    assert all(p.grad is not None for m in model.predictors() for p in m.parameters())
    attn = out["layers"][0]["attn"]
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="keep_rate"):
        _tiny(keep_rate=0.0)
    with pytest.raises(ValueError, match="attention mode"):
        _tiny().set_attn_mode("fast")
    assert keep_count(0.25, 197) == 50


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs" / "sparsifiner").glob("*.py")), ids=lambda p: p.name)
def test_configs_load_and_build(cfg):
    from mmengine.config import Config
    c = Config.fromfile(str(cfg))
    m = c.model
    assert m.type == "SparsifinerClassifier"
    kwargs = dict(m.get("model_kwargs") or {})
    if "img_size" not in kwargs:
        kwargs["depth"] = 1
    model = timm.create_model(m.model_name.split(".")[0], num_classes=m.num_classes, **kwargs)
    assert isinstance(model, Sparsifiner)
    assert c.test_dataloader.dataset.split == "val"


# -- LV-ViT variant ------------------------------------------------------------------------------

class _RefLVViT(torch.nn.Module):
    """A small stand-in for TokenLabeling's LV_ViT (return_dense, p_emb '4_2'), with its key names:
    patch_embed.{conv1,bn1,conv2,bn2,conv3,bn3,proj}, cls_token, pos_embed, blocks.i.{norm1,
    attn.qkv (no bias), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head, aux_head."""

    def __init__(self, img=64, patch=16, dim=32, depth=2, heads=2, mlp=3, classes=10, skip_lam=2.0):
        super().__init__()
        nn = torch.nn
        pe = nn.Module()
        pe.conv1, pe.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        pe.conv2, pe.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        pe.conv3, pe.bn3 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        pe.proj = nn.Conv2d(64, dim, patch // 2, patch // 2)
        self.patch_embed = pe
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, mlp * dim), nn.Linear(mlp * dim, dim)
            self.blocks.append(b)
        self.norm, self.head, self.aux_head = nn.LayerNorm(dim), nn.Linear(dim, classes), nn.Linear(dim, classes)
        self.heads, self.skip_lam = heads, skip_lam

    def _attn(self, a, x):
        B, N, C = x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        w = ((q * (C // self.heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        return a.proj((w @ v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        pe = self.patch_embed
        for conv, bn in ((pe.conv1, pe.bn1), (pe.conv2, pe.bn2), (pe.conv3, pe.bn3)):
            x = F.relu(bn(conv(x)))
        x = pe.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            x = x + self._attn(b.attn, b.norm1(x)) / self.skip_lam
            x = x + b.mlp.fc2(F.gelu(b.mlp.fc1(b.norm2(x)))) / self.skip_lam
        x = self.norm(x)
        return self.head(x[:, 0]), self.aux_head(x[:, 1:])


def _lvvit(**kw):
    args = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    return timm.create_model("sparsifiner_lvvit_s_224", **args)


def test_lvvit_loads_tokenlabeling_layout_and_matches_reference():
    torch.manual_seed(0)
    ref = _RefLVViT().eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):      # non-trivial eval statistics
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    # released checkpoints come from timm's trainer: under 'state_dict', DDP 'module.' prefixes
    sd = {"state_dict": {"module." + k: v.clone() for k, v in ref.state_dict().items()}}
    model = _lvvit(keep_rate=1.0).eval()
    model.load_state_dict(checkpoint_filter_fn(sd, model))        # strict: every key maps
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cls_ref, aux_ref = ref(x)
        want = cls_ref + 0.5 * aux_ref.max(1).values             # upstream's evaluation output
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        cls, aux = model.forward_dense(x)
        torch.testing.assert_close(cls, cls_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-5)
        model.set_attn_mode("dense")                              # the teacher
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model.set_attn_mode("sparse")
        model.set_keep_rate(0.25)
        assert (model(x) - want).abs().max() > 1e-4
    # another input size: pos_embed resampled by the filter; no aux head: aux_head dropped
    other = _lvvit(img_size=96, aux_head=False)
    other.load_state_dict(checkpoint_filter_fn(sd, other))
    assert other.pos_embed.shape == (1, 37, 32) and other.aux_head is None


def test_lvvit_heads_skip_lam_and_param_count():
    torch.manual_seed(0)
    model = _lvvit().eval()
    assert all(b.ls1.skip_lam == 2.0 and b.ls2.skip_lam == 2.0 for b in model.blocks)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].mlp.fc1.out_features == 96
    assert model.patch_embed.feat_ratio() == 16 and model.feature_info[-1]["reduction"] == 16
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats),
                                   model.head(feats[:, 0]) + 0.5 * model.aux_head(feats[:, 1:]).amax(1))
        assert model.forward_head(feats, pre_logits=True).shape == (1, 32)
    model.reset_classifier(5)
    assert model.aux_head.out_features == 5 and model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert model.aux_head is None and model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    with pytest.raises(ValueError, match="even patch size"):
        _lvvit(patch_size=15)
    with pytest.raises(ValueError, match="init_values"):
        _lvvit(init_values=1e-5)
    with torch.device("meta"):
        full = timm.create_model("sparsifiner_lvvit_s_224")
    n_pred = sum(p.numel() for m in full.predictors() for p in m.parameters())
    assert n_pred == 16 * (2 * (64 * 32 + 32) + 2 * 197 * 32)
    assert sum(p.numel() for p in full.parameters()) - n_pred == 26_151_824   # TokenLabeling: 26.15 M


# -- token pruning -------------------------------------------------------------------------------

def test_gathered_predictor_equals_predictor_on_full_set():
    torch.manual_seed(0)
    pred = ConnectivityPredictor(16, 2, (4, 4), coef_topk=2)
    with torch.no_grad():
        pred.proj_back_n.copy_(torch.randn(17, 2) * 0.05)
    q, k = torch.randn(2, 2, 17, 16), torch.randn(2, 2, 17, 16)
    pos = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(pred(q, k, token_pos=pos, num_patches=16), pred(q, k))
    # a subset: the predictor of the kept tokens with their own projection rows
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 14, 15]])
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], 1)
    qs = q.gather(2, rows[:, None, :, None].expand(-1, 2, -1, 16))
    ks = k.gather(2, rows[:, None, :, None].expand(-1, 2, -1, 16))
    got = pred(qs, ks, token_pos=keep, num_patches=16)
    for b in range(2):
        down, up = pred.proj_n[rows[b]], pred.proj_back_n[rows[b]]
        coef = ((pred.proj_c_q(qs[b]) @ (pred.proj_c_k(ks[b]).transpose(-1, -2) @ down)) * 2 ** -0.5).softmax(-1)[:, 1:]
        basis = up.abs().t()
        torch.testing.assert_close(got[b], coef @ torch.where(basis > 0.02, basis, torch.zeros_like(basis)))


def test_token_pruning_counts_shapes_gradients():
    torch.manual_seed(0)
    base = _tiny(depth=4, embed_dim=64, num_heads=2)
    model = _tiny(depth=4, embed_dim=64, num_heads=2, token_pruning_loc=(1, 2), token_keep_rate_base=0.7)
    model.load_state_dict(base.state_dict())
    assert model.token_keep_counts(64) == {1: math.ceil(0.7 * 64), 2: math.ceil(0.7 ** 2 * 64)} == {1: 45, 2: 32}
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model.forward_aux(x)
    assert out["tokens"].shape == (2, 1 + 32, 64) and out["logits"].shape == (2, 7)
    assert out["layers"][1]["token_index"].shape == (2, 45) and out["layers"][2]["token_index"].shape == (2, 32)
    torch.testing.assert_close(out["token_index"], out["layers"][2]["token_index"])
    # kept positions are nested, sorted and distinct; the attention after pruning runs on N' tokens
    i1, i2 = out["layers"][1]["token_index"], out["layers"][2]["token_index"]
    assert all(set(i2[b].tolist()) <= set(i1[b].tolist()) for b in range(2))
    assert (i2.diff(dim=-1) > 0).all()
    conn = out["layers"][2]["connectivity"]
    assert conn.q_len == conn.kv_len == 46
    assert (conn.to_dense_mask()[:, :, 1:].sum(-1) == math.ceil(0.25 * 46)).all()
    assert model.forward_features(x).shape == (2, 33, 64)
    with pytest.raises(ValueError, match="token pruning is on"):
        model.forward_intermediates(x)
    # gradients reach every trainable parameter through the gathers
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # off (no layers, or base 1.0, or not the sparse mode): exactly the unpruned model
    base.eval()
    model.eval()
    with torch.no_grad():
        want = base(x)
        model.set_token_pruning((1, 2), 1.0)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        model.set_token_pruning(())
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="token_pruning_loc"):
        model.set_token_pruning((4,))
    with pytest.raises(ValueError, match="token_keep_rate_base"):
        model.set_token_pruning((1,), 0.0)


def test_token_pruning_keeps_top_cls_attention_tokens():
    """Pruning after the last block's attention: the final tokens are the unpruned model's tokens at
    the top-k cls-attention positions (pruning sits before the per-token MLP)."""
    torch.manual_seed(0)
    model = _tiny(depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.blocks[1].attn.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))   # returns None
    with torch.no_grad():
        full = model.forward_features(x)
    hook.remove()
    model.set_token_pruning((1,), 0.5)
    with torch.no_grad():
        out = model.forward_aux(x)
        attn = model.blocks[1].attn
        q, k, _ = attn._qkv(seen["x"])
        cls = ((q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0, 1:].mean(1)
    idx = out["token_index"]
    assert idx.shape == (2, 32)
    for b in range(2):
        assert set(idx[b].tolist()) == set(cls[b].topk(32).indices.tolist())
    want = torch.cat([full[:, :1], full[:, 1:].gather(1, idx[..., None].expand(-1, -1, 192))], 1)
    torch.testing.assert_close(out["tokens"], want, rtol=1e-5, atol=1e-5)


