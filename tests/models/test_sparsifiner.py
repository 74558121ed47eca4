"""Sparsifiner: timm-equivalence at keep 1.0, connectivity mask, kernel path vs masked dense
attention, predictor math, any-size token projections, checkpoint filtering, recipe losses."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from zoo.layers.connectivity import ConnectivityPredictor, keep_count, resample_token_proj, topk_connectivity
from zoo.models.sparsifiner import Sparsifiner, checkpoint_filter_fn, sparse_attention

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


def test_kernel_path_equals_masked_dense_forward_backward():
    torch.manual_seed(0)
    B, H, N, D = 2, 3, 50, 16
    q, k, v = [torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    conn = topk_connectivity(torch.randn(B, H, N - 1, N, dtype=torch.float64), 0.25)
    mask = conn.to_dense_mask()
    scale = D ** -0.5
    out = sparse_attention(q, k, v, conn, scale)
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
    with pytest.raises(ValueError, match="attn_drop"):
        _tiny(attn_drop_rate=0.1)
    assert keep_count(0.25, 197) == 50


def test_engine_phases_losses():
    from mmengine.structures import BaseDataElement

    from zoo.engine.sparsifiner_model import SparsifinerClassifier
    kw = dict(model_name="sparsifiner_deit_tiny_patch16_224", num_classes=10,
              model_kwargs=dict(img_size=32, patch_size=8, depth=2))
    x = torch.randn(2, 3, 32, 32)
    ds = [BaseDataElement(gt_label=torch.tensor(i)) for i in (1, 3)]
    p1 = SparsifinerClassifier(phase="predictor", **kw).train()
    trainable = {n for n, p in p1.named_parameters() if p.requires_grad}
    assert trainable and all(".mask_predictor." in n for n in trainable)
    loss = p1.loss(x, ds)["loss_recon"]
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for n, p in p1.named_parameters() if n in {
        "model." + t.split("model.", 1)[1] for t in trainable})
    p2 = SparsifinerClassifier(phase="backbone", **kw).train()
    p2.model.load_state_dict(p1.model.state_dict())
    losses = p2.loss(x, ds)
    assert set(losses) == {"loss_cls", "loss_kd", "loss_token"}
    sum(losses.values()).backward()
    assert not any(".mask_predictor." in n for n, p in p2.named_parameters() if p.requires_grad)
    assert all(p.grad is not None for p in p2.parameters() if p.requires_grad)
    assert not any(k.startswith("_teacher") for k in p2.state_dict())
    # an explicit timm teacher (the ImageNet phase-2 config uses deit_small_patch16_224.fb_in1k)
    p3 = SparsifinerClassifier(phase="backbone", teacher_model_name="deit_tiny_patch16_224", teacher_pretrained=False,
                               teacher_kwargs=dict(img_size=32, patch_size=8, depth=2), **kw)
    assert not any("teacher" in k for k in p3.state_dict())
    assert torch.isfinite(sum(p3.loss(x, ds).values()))


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
