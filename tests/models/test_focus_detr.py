"""Focus-DETR: known answers for the foreground selector, cascade, OESM (kernel vs a plain
gather-MHA-scatter oracle), FCOS targets, CDN mask, value semantics, small/empty images, losses,
registration and the detrex checkpoint conversion (ResNet and detectron2 Swin layouts)."""
import copy
import math
import re
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformerBlock

import zoo  # noqa: F401
from zoo.errors import UnsupportedError
from zoo.models._builder import PretrainedMismatchError
from zoo.layers.detr_blocks import (HungarianMatcher, PositionEmbeddingSine, build_cdn_queries, cdn_attn_mask,
                                    dn_match_indices, sine_box_embed)
from zoo.models.focus_detr import (FocusDETR, ForegroundTokenSelector, MaskPredictor, OESMAttention,
                                   PadFirstSwinBlock, cascade_token_counts, checkpoint_filter_fn,
                                   foreground_targets, select_foreground)

torch.set_num_threads(1)


def _tiny(**kw):
    torch.manual_seed(0)
    return timm.create_model("focus_detr_tiny", **kw)


def _tiny_swin(**kw):
    """focus_detr_tiny on a small timm Swin set up as focus_detr_swin_* (windows of 4, every stage
    shifted, output LayerNorms, detectron2 padding order)."""
    torch.manual_seed(0)
    bk = dict(img_size=64, strict_img_size=False, always_partition=True, embed_dim=16, depths=(2, 2, 2, 2),
              num_heads=(1, 2, 2, 4), window_size=4, embed_layer=partial(PatchEmbed, dynamic_img_pad=True))
    return timm.create_model("focus_detr_tiny", backbone="swin_tiny_patch4_window7_224", backbone_out_indices=(1, 2, 3),
                             backbone_norm=True, swin_pad_first=True, backbone_kwargs=bk, **kw)


def _targets():
    return [dict(labels=torch.tensor([1, 3]), boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])),
            dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))]


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


# ------------------------------------------------------------------------------------------------
# foreground token selector
# ------------------------------------------------------------------------------------------------
def test_mask_predictor_known_answers():
    torch.manual_seed(0)
    mp = MaskPredictor(16, 16)
    x = torch.randn(1, 1, 16).expand(2, 7, 16)
    out = mp(x)
    assert out.shape == (2, 7, 1)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))  # identical tokens -> identical logits
    # layer2 with zero weights returns its last bias
    for m in mp.layer2:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.constant_(mp.layer2[-1].bias, 1.25)
    torch.testing.assert_close(mp(torch.randn(2, 5, 16)), torch.full((2, 5, 1), 1.25))
    # z_global is the mean over every token of the level (padding included)
    torch.manual_seed(1)
    mp = MaskPredictor(16, 16)
    x = torch.randn(2, 9, 16)
    z = mp.layer1(x)
    ref = mp.layer2(torch.cat([z[..., :8], z[..., 8:].mean(1, keepdim=True).expand(-1, 9, -1)], -1))
    torch.testing.assert_close(mp(x), ref)


def test_fts_alpha_zero_scores_levels_independently():
    torch.manual_seed(0)
    fts = ForegroundTokenSelector(16, num_levels=3)
    shapes = [(4, 6), (2, 3), (1, 2)]
    mem = torch.randn(2, sum(h * w for h, w in shapes), 16)
    with torch.no_grad():
        fts.alpha.zero_()
    out = fts(mem, shapes)
    parts = mem.split([h * w for h, w in shapes], 1)
    ref = torch.cat([fts.mask_predictor(p).squeeze(-1) for p in parts], 1)
    torch.testing.assert_close(out, ref)


def test_fts_modulation_with_constant_coarse_logit():
    """A constant coarse logit c upsamples to c, so level features become m * (1 + a * c)."""
    fts = ForegroundTokenSelector(8, num_levels=2)
    seen = []

    class Const(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.full(x.shape[:2] + (1,), 1.5)

    fts.mask_predictor = Const()
    with torch.no_grad():
        fts.alpha.fill_(0.2)
    shapes = [(4, 4), (2, 2)]
    mem = torch.randn(1, 20, 8)
    fts(mem, shapes)
    torch.testing.assert_close(seen[0], mem[:, 16:])  # coarsest first, unmodulated
    torch.testing.assert_close(seen[1], mem[:, :16] * (1 + 0.2 * 1.5))


def test_cascade_counts_and_nested_padding_free_selection():
    focus, ks = cascade_token_counts(torch.tensor([2125, 2000]), 0.5, (1.0, 0.8, 0.6, 0.6, 0.4, 0.2), 3000)
    assert focus.tolist() == [1063, 1001]
    assert ks == [1063, 850, 637, 637, 425, 212]
    # padded tokens are never selected while k <= valid tokens; subsets are nested prefixes
    torch.manual_seed(0)
    logits = torch.randn(2, 50) + 5.0
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    logits[1, 30:] = 100.0  # would win if padding were not filled with the minimum
    filled, order, focus, ks = select_foreground(logits, mask, 0.5, (1.0, 0.5))
    assert ks == [26, 13] and focus.tolist() == [26, 16]
    assert (order[1] < 30).all()
    torch.testing.assert_close(order[0], logits[0].topk(26).indices)


# ------------------------------------------------------------------------------------------------
# OESM through the kernel vs a gather / nn.MultiheadAttention / scatter oracle
# ------------------------------------------------------------------------------------------------
def test_oesm_kernel_equals_gather_mha_scatter_oracle():
    torch.manual_seed(0)
    B, N, C, H, k = 2, 40, 32, 4, 8
    oesm = OESMAttention(C, H, topk_sa=k)
    with torch.no_grad():
        oesm.attn.in_proj_bias.normal_()
        oesm.norm.weight.normal_()
    mha = nn.MultiheadAttention(C, H, batch_first=True)
    mha.in_proj_weight.data.copy_(oesm.attn.in_proj_weight.data)
    mha.in_proj_bias.data.copy_(oesm.attn.in_proj_bias.data)
    mha.out_proj.load_state_dict(oesm.attn.out_proj.state_dict())
    x, pos = torch.randn(B, N, C), torch.randn(B, N, C)
    score = torch.randperm(B * N).float().view(B, N)  # distinct: no top-k ties
    out = oesm(x, pos, score)
    ref = x.clone()
    for b in range(B):
        sel = score[b].topk(k).indices
        xs, ps = x[b, sel][None], pos[b, sel][None]
        y = mha(xs + ps, xs + ps, xs, need_weights=False)[0]
        ref[b, sel] = oesm.norm(xs + y)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # unselected tokens untouched, gradients reach the attention weights
    untouched = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        untouched[b, score[b].topk(k).indices] = False
    assert torch.equal(out[untouched], x[untouched])
    out.sum().backward()
    assert oesm.attn.in_proj_weight.grad.abs().sum() > 0


def test_oesm_clamps_topk_to_set_size():
    """Upstream's topk(300) raises on small sets (detrex#354); here k = min(topk_sa, tokens)."""
    oesm = OESMAttention(16, 2, topk_sa=300)
    x = torch.randn(1, 5, 16)
    out = oesm(x, torch.zeros_like(x), torch.randn(1, 5))
    assert out.shape == x.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# targets, denoising, encoder value semantics
# ------------------------------------------------------------------------------------------------
def test_fcos_foreground_targets_by_hand():
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    t = foreground_targets(shapes, (8, 16, 32, 64), ((-1, 64), (64, 128), (128, 256), (256, 1e8)),
                           [torch.tensor([[8., 8., 40., 40.]])])
    lvl0 = t[0, :64].view(8, 8)
    expect = torch.zeros(8, 8)
    expect[1:5, 1:5] = 1  # centres 12, 20, 28, 36 lie inside (8, 40); max offset <= 32
    assert torch.equal(lvl0, expect) and int(t[0].sum()) == 16
    assert int(t[0, 64:].sum()) == 0


def _upstream_style_cdn_mask(pad_size, single, dn_groups, num_queries):
    """The detrex loop written out (True = blocked), used as the oracle for cdn_attn_mask."""
    n = pad_size + num_queries
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[pad_size:, :pad_size] = True
    for i in range(dn_groups):
        rows = slice(single * i, single * (i + 1))
        blocked[rows, single * (i + 1):pad_size] = True
        blocked[rows, :single * i] = True
    return ~blocked


def test_cdn_mask_and_queries():
    mask = cdn_attn_mask(8, 4, 4)
    expect = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    ] + [[0] * 8 + [1] * 4] * 4, dtype=torch.bool)
    assert torch.equal(mask, expect)
    assert torch.equal(cdn_attn_mask(8 * 50, 8, 900), _upstream_style_cdn_mask(400, 8, 50, 900))
    # two GTs in one image, dn_number 4 -> 4 // 2 = 2 groups of (2 pos + 2 neg)
    torch.manual_seed(0)
    enc = nn.Embedding(5, 8)
    tg = [dict(labels=torch.tensor([1, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])),
          dict(labels=torch.tensor([4]), boxes=torch.tensor([[0.6, 0.4, 0.3, 0.3]]))]
    ql, qb, meta = build_cdn_queries(tg, 4, 0.0, 0.0, 5, enc)
    assert meta == dict(pad_size=8, group_size=4, groups=2, max_gt=2)
    assert ql.shape == (2, 8, 8) and qb.shape == (2, 8, 4)
    # without noise every copy is the GT (positives slots 0-1, negatives 2-3, then group 2)
    torch.testing.assert_close(qb[0, [0, 1, 2, 3, 4, 5]].sigmoid(), tg[0]["boxes"].repeat(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ql[1, 0], enc.weight[4])
    assert torch.equal(ql[1, 1], torch.zeros(8))  # image 1 has a single GT: slot 1 is padding
    idx = dn_match_indices(tg, meta)
    assert idx[0][0].tolist() == [0, 1, 4, 5] and idx[0][1].tolist() == [0, 1, 0, 1]
    assert idx[1][0].tolist() == [0, 4]
    # with noise, negatives move further than positives (corner jitter 1-2x vs 0-1x half-size)
    ql, qb, meta = build_cdn_queries(tg * 8, 64, 0.0, 1.0, 5, enc)
    gt = tg[0]["boxes"][0]
    b = qb.sigmoid()
    pos_err = (b[0, 0::4] - gt).abs().mean()
    neg_err = (b[0, 2::4] - gt).abs().mean()
    assert neg_err > pos_err


def test_cdn_layout_through_kernel_isolates_matching_queries():
    """Decoder self-attention with the CDN mask as a from_dense_mask layout: changing denoising
    queries leaves matching queries untouched, and equals dense masked softmax attention."""
    import zoo.kernels as K
    from zoo.models.focus_detr import KernelMHA

    torch.manual_seed(0)
    attn = KernelMHA(16, 2)
    pad, nq = 8, 5
    mask = cdn_attn_mask(pad, 4, nq)
    layout = K.from_dense_mask(mask[None, None])
    x, pos = torch.randn(2, pad + nq, 16), torch.randn(2, pad + nq, 16)
    a = attn(x, pos, layout)
    x2 = x.clone()
    x2[:, :pad] = torch.randn(2, pad, 16)
    b = attn(x2, pos, layout)
    torch.testing.assert_close(a[:, pad:], b[:, pad:])
    assert not torch.allclose(a[:, :4], b[:, :4])
    # dense oracle
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    mha.in_proj_weight.data.copy_(attn.in_proj_weight.data)
    mha.in_proj_bias.data.copy_(attn.in_proj_bias.data)
    mha.out_proj.load_state_dict(attn.out_proj.state_dict())
    ref = mha(x + pos, x + pos, x, attn_mask=~mask, need_weights=False)[0]
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_encoder_value_is_original_features(tiny):
    """detrex mode: every encoder layer's deformable attention reads the un-updated features."""
    seen = []
    hooks = [layer.cross_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["value"].detach().clone()),
                                                        with_kwargs=True) for layer in tiny.encoder]
    try:
        tiny.eval()
        with torch.no_grad():
            tiny(torch.randn(1, 3, 64, 96))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(tiny.encoder) >= 2
    for v in seen[1:]:
        assert torch.equal(v, seen[0])


# ------------------------------------------------------------------------------------------------
# whole model
# ------------------------------------------------------------------------------------------------
def test_small_images_and_empty_targets_train_and_infer(tiny):
    crit = tiny.create_criterion()
    x = torch.randn(2, 3, 128, 128)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[1, :, 96:] = True
    tiny.train()
    out = tiny(x, masks, _targets())
    assert out["dn_meta"]["pad_size"] == 2 * 2 * 10  # dn_number 20 // 2 GTs = 10 groups of 4
    losses = crit(out, _targets(), [(128, 128), (128, 96)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    tiny.zero_grad()
    total.backward()
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # a batch without any object: no denoising queries, losses still finite
    empty = [dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))]
    out = tiny(torch.randn(1, 3, 64, 64), None, empty)
    assert "dn_outputs" not in out
    losses = crit(out, empty, [(64, 64)])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # inference on 128x128 and on a tiny 32x32 image (fewer tokens than queries)
    tiny.eval()
    with torch.no_grad():
        for s in (128, 32):
            o = tiny(torch.randn(1, 3, s, s))
            res = tiny.postprocess(o, [(s, s)])
            assert res[0]["boxes"].shape[-1] == 4 and (res[0]["boxes"] <= s + 1e-4).all()
            assert torch.isfinite(o["pred_boxes"]).all()


def test_default_size_model_at_small_input():
    """Full-size settings (topk_sa 300, 900 queries, cascade of 6) on a 128x128 image: upstream raises."""
    torch.manual_seed(0)
    m = timm.create_model("focus_detr_tiny", enc_layers=6, cascade=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2), topk_sa=300,
                          num_queries=900, num_select=300).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 128, 128))
    assert out["pred_logits"].shape == (1, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2, 10)


def test_grad_checkpointing_same_output(tiny):
    tiny.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny(x)["pred_boxes"]
    tiny.set_grad_checkpointing(True)
    try:
        with torch.no_grad():
            b = tiny(x)["pred_boxes"]
    finally:
        tiny.set_grad_checkpointing(False)
    torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="images must be"):
        tiny(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="masks must be"):
        tiny(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="one ratio per encoder layer"):
        FocusDETR(backbone="test_resnet", backbone_freeze_at=0, embed_dim=32, gn_groups=8, enc_layers=2,
                  cascade=(1.0,))


def test_matcher_finds_exact_boxes():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.3]])
    pred = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.7, 0.7, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 4)
    i, j = HungarianMatcher()(logits, pred, [dict(labels=torch.tensor([0, 3]), boxes=boxes)])[0]
    assert dict(zip(j.tolist(), i.tolist())) == {0: 2, 1: 1}


def test_position_embeddings_known_values():
    pe = PositionEmbeddingSine(4, temperature=10000, normalize=False)
    out = pe(torch.zeros(1, 2, 3, dtype=torch.bool))
    # channel 0 is sin(y / 1) with y = 1-based row count; channel 4 is sin(x)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0] * 3, [2.0] * 3]).sin())
    torch.testing.assert_close(out[0, 4], torch.tensor([[1.0, 2.0, 3.0]] * 2).sin())
    e = sine_box_embed(torch.tensor([[0.25, 0.5]]), 2)
    torch.testing.assert_close(e, torch.tensor([[math.sin(math.pi), math.cos(math.pi),
                                                 math.sin(math.pi / 2), math.cos(math.pi / 2)]]))


# ------------------------------------------------------------------------------------------------
# registration, cfgs, checkpoint conversion
# ------------------------------------------------------------------------------------------------
def test_registered_models_and_cfgs():
    for name in ("focus_detr_r50", "focus_detr_r101", "focus_detr_swin_tiny", "focus_detr_swin_base_384",
                 "focus_detr_tiny"):
        assert timm.is_model(name)
    tags = timm.list_pretrained("focus_detr_r50.*")
    assert {"focus_detr_r50.detrex_coco_12ep", "focus_detr_r50.detrex_coco_24ep",
            "focus_detr_r50.detrex_coco_36ep"} <= set(tags)
    cfg = timm.models.get_pretrained_cfg("focus_detr_swin_tiny.detrex_coco_36ep")
    assert cfg.url.endswith("_12ep.pth") and any("mislabelled" in n for n in cfg.notes)
    with torch.device("meta"):
        m = timm.create_model("focus_detr_r50")
    n = sum(p.numel() for p in m.parameters())
    assert 40e6 < n < 55e6, n
    assert m.backbone_strides == (8, 16, 32) and m.strides == (8, 16, 32, 64)
    # frozen BN and frozen stem (detectron2 freeze_at=1)
    assert not any(p.requires_grad for p in m.backbone.conv1.parameters())
    assert all(p.requires_grad for p in m.backbone.layer1.parameters())
    assert type(m.backbone.bn1).__name__ == "FrozenBatchNorm2d"


_D2_OF_TIMM = [
    (r"^backbone\.conv1\.", "backbone.stem.conv1."),
    (r"^backbone\.bn1\.", "backbone.stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
    (r"^backbone\.layers_(\d)\.downsample\.", lambda m: f"backbone.layers.{int(m[1]) - 1}.downsample."),
    (r"^backbone\.layers_(\d)\.blocks\.", r"backbone.layers.\1.blocks."),
    (r"^backbone_norms\.(\d)\.", lambda m: f"backbone.norm{int(m[1]) + 1}."),
    (r"^level_embed$", "transformer.level_embeds"),
    (r"^fts\.alpha$", "transformer.alpha"),
    (r"^fts\.mask_predictor\.", "transformer.enc_mask_predictor."),
    (r"^(tgt_embed|enc_output|enc_output_norm)\.", r"transformer.\1."),
    (r"^encoder\.(\d+)\.oesm\.attn\.", r"transformer.encoder.layers.\1.attentions.0.attn."),
    (r"^encoder\.(\d+)\.oesm\.norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^encoder\.(\d+)\.cross_attn\.", r"transformer.encoder.layers.\1.attentions.1."),
    (r"^encoder\.(\d+)\.norm(\d)\.", lambda m: f"transformer.encoder.layers.{m[1]}.norms.{int(m[2]) - 1}."),
    (r"^(en|de)coder\.(?:layers\.)?(\d+)\.ffn\.fc1\.", r"transformer.\1coder.layers.\2.ffns.0.layers.0.0."),
    (r"^(en|de)coder\.(?:layers\.)?(\d+)\.ffn\.fc2\.", r"transformer.\1coder.layers.\2.ffns.0.layers.1."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.", r"transformer.decoder.layers.\1.attentions.0.attn."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"transformer.decoder.layers.\1.attentions.1."),
    (r"^decoder\.layers\.(\d+)\.norm(\d)\.", lambda m: f"transformer.decoder.layers.{m[1]}.norms.{int(m[2]) - 1}."),
    (r"^decoder\.(ref_point_head|norm)\.", r"transformer.decoder.\1."),
]


def _as_detrex_checkpoint(model):
    """A state dict laid out like a detrex Focus-DETR checkpoint (detectron2 ResNet names,
    transformer.* names, tied head aliases, num_batches_tracked-free FrozenBN)."""
    sd = {}
    for k, v in model.state_dict().items():
        nk = k
        for pat, rep in _D2_OF_TIMM:
            new = re.sub(pat, rep, nk)
            if new != nk:
                nk = new
                break
        sd[nk] = v.clone()
        if nk.endswith(".attn.relative_position_bias_table"):  # detectron2 Swin saves its index buffer
            sd[nk.replace("_bias_table", "_index")] = torch.zeros(16, 16, dtype=torch.long)
    n_dec = len(model.decoder.layers)
    for k, v in model.state_dict().items():
        if k.startswith(("class_embed.", "bbox_embed.")):
            sd["transformer.decoder." + k] = v.clone()
        if k.startswith(f"class_embed.{n_dec}."):
            for i in range(len(model.encoder)):
                sd[k.replace(f"class_embed.{n_dec}.", f"transformer.encoder.enhance_MCSP.{i}.")] = v.clone()
    return {"model": sd, "iteration": 1}


def test_checkpoint_filter_fn_on_detrex_layout():
    # a plain torchvision-style ResNet backbone, so the detectron2 names apply (stem / resN / shortcut)
    kw = dict(backbone="resnet18", backbone_freeze_at=1)
    src = _tiny(**kw)
    src.eval()
    ckpt = _as_detrex_checkpoint(src)
    assert "backbone.stem.conv1.weight" in ckpt["model"] and "transformer.encoder.enhance_MCSP.0.weight" in ckpt["model"]
    assert any(k.startswith("backbone.res2.0.conv1.norm.") for k in ckpt["model"])
    dst = _tiny(**kw)
    torch.manual_seed(123)
    for p in dst.parameters():
        nn.init.normal_(p)
    sd = checkpoint_filter_fn(ckpt, dst)
    missing, unexpected = dst.load_state_dict(sd, strict=True)
    dst.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)["pred_boxes"], src(x)["pred_boxes"])
    # an alias that disagrees with its head is an error, a converted dict passes through
    bad = _as_detrex_checkpoint(src)
    bad["model"]["transformer.decoder.class_embed.0.bias"] += 1
    with pytest.raises(ValueError, match="alias"):
        checkpoint_filter_fn(bad, dst)
    assert checkpoint_filter_fn(src.state_dict(), dst).keys() == src.state_dict().keys()


def test_checkpoint_filter_fn_on_detectron2_swin_layout():
    """detectron2 SwinTransformer names (stage-end PatchMerging, output norms norm1..3, saved
    relative_position_index) map onto the timm Swin backbone; odd image sizes run (padded to
    whole patches and windows) with the same outputs after the round trip."""
    src = _tiny_swin().eval()
    with torch.no_grad():
        for norm in src.backbone_norms:
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    ckpt = _as_detrex_checkpoint(src)
    keys = ckpt["model"]
    assert "backbone.layers.0.downsample.reduction.weight" in keys
    assert "backbone.layers.3.downsample.norm.weight" not in keys
    assert {"backbone.norm1.weight", "backbone.norm3.bias"} <= set(keys) and "backbone.norm0.weight" not in keys
    assert "backbone.layers.0.blocks.1.attn.relative_position_index" in keys
    dst = _tiny_swin()
    torch.manual_seed(123)
    for p in dst.parameters():
        nn.init.normal_(p)
    dst.load_state_dict(checkpoint_filter_fn(ckpt, dst), strict=True)
    dst.eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        feats = dst.forward_neck(x)
        out = dst(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(9, 12), (5, 6), (3, 3), (2, 2)]
    with torch.no_grad():
        torch.testing.assert_close(out["pred_logits"], src(x)["pred_logits"])
    # ResNet models have no output norms: their keys are unchanged
    assert _tiny().backbone_norms is None
    with pytest.raises(ValueError, match="swin_pad_first=True needs a timm Swin backbone"):
        _tiny(swin_pad_first=True)


def test_pad_first_swin_block_pads_before_the_shift():
    """detectron2's order (pad to whole windows, then shift) equals timm's block run on the
    already padded map and cropped; timm's own order (shift, then pad) differs on such maps."""
    torch.manual_seed(0)
    timm_blk = SwinTransformerBlock(8, (8, 8), num_heads=2, window_size=4, shift_size=2, always_partition=True,
                                    dynamic_mask=True)
    blk = copy.deepcopy(timm_blk)
    blk.__class__ = PadFirstSwinBlock
    with torch.no_grad():
        timm_blk.attn.relative_position_bias_table.normal_()
        blk.attn.relative_position_bias_table.copy_(timm_blk.attn.relative_position_bias_table)
        y = torch.randn(2, 6, 7, 8)
        padded = F.pad(y, (0, 0, 0, 1, 0, 2))
        expect = timm_blk._attn(padded)[:, :6, :7]
        torch.testing.assert_close(blk._attn(y), expect)
        assert not torch.allclose(timm_blk._attn(y), expect, atol=1e-3)
        torch.testing.assert_close(blk._attn(padded), timm_blk._attn(padded))


def test_pretrained_file_load_through_create_model(tmp_path):
    """A detrex-layout checkpoint file loads through timm.create_model(pretrained=True, file=...),
    the zoo hub's strict key check included; another class count keeps fresh heads."""
    kw = dict(backbone="resnet18", backbone_freeze_at=1)
    src = _tiny(**kw).eval()
    path = tmp_path / "focus_detr_detrex.pth"
    torch.save(_as_detrex_checkpoint(src), path)
    m = timm.create_model("focus_detr_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x)["pred_boxes"], src(x)["pred_boxes"])
    with pytest.raises(PretrainedMismatchError, match="class_embed.*pretrained_head='reset'"):
        timm.create_model("focus_detr_tiny", pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=str(path)), **kw)  # a head that does not fit
    m5 = timm.create_model("focus_detr_tiny", pretrained=True, num_classes=5, pretrained_head="reset",
                           pretrained_cfg_overlay=dict(file=str(path)), **kw)
    assert m5.class_embed[0].weight.shape[0] == 5
    torch.testing.assert_close(m5.level_embed, src.level_embed)


# ------------------------------------------------------------------------------------------------
# timm generic calls, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------
def test_unpadded_budgets_are_static_and_equal_the_tensor_rule():
    """Without padding the per-layer counts come from Python ints (float32 products as upstream);
    they equal the tensor rule, and an unpadded forward equals one with an all-False mask."""
    cascade = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
    for rho in (0.5, 0.3, 0.1, 0.7, 0.33):
        for n in list(range(1, 300)) + [5440, 13294, 21760]:
            focus_t, ks_t = cascade_token_counts(torch.tensor([n, n]), rho, cascade, n)
            focus_i, ks_i = cascade_token_counts(n, rho, cascade, n)
            assert ks_i == ks_t and focus_i == int(focus_t[0]), (rho, n)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g)
    a = select_foreground(logits, None, 0.5, (1.0, 0.6))
    b = select_foreground(logits, torch.zeros(2, 50, dtype=torch.bool), 0.5, (1.0, 0.6))
    assert a[3] == b[3] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    m = _tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = m(x, torch.zeros(2, 64, 96, dtype=torch.bool))
        out = m(x)
    for k in ("pred_logits", "pred_boxes", "fg_logits"):
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


def test_deformable_attention_python_shapes_equal_tensor_shapes():
    """The detector hands the deformable attention Python (h, w) pairs (no host sync, traceable);
    the op gives what it gives for tensor shapes, and checks them the same way."""
    from zoo.kernels.msda import ms_deform_attn

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(2, 30, 2, 8, generator=g)
    loc = torch.rand(2, 5, 2, 2, 3, 2, generator=g)
    attn = torch.rand(2, 5, 2, 2, 3, generator=g)
    ref = ms_deform_attn(value, torch.tensor(shapes), torch.tensor([0, 24]), loc, attn)
    torch.testing.assert_close(ms_deform_attn(value, shapes, [0, 24], loc, attn), ref, rtol=0, atol=0)
    torch.testing.assert_close(ms_deform_attn(value, shapes, None, loc, attn), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="running sum"):
        ms_deform_attn(value, shapes, [0, 20], loc, attn)
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn(value, [(4, 6), (2, 2)], None, loc, attn)


def test_features_only_returns_neck_maps():
    """features_only: every neck level by default (strides 8..64, embed_dim channels), matching
    feature_info; the transformer after the neck is pruned away."""
    full = _tiny().eval()
    torch.manual_seed(0)
    feats = timm.create_model("focus_detr_tiny", features_only=True).eval()
    feats.model.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith(("backbone.", "neck."))})
    info = feats.feature_info
    assert info.reduction() == [8, 16, 32, 64] and info.channels() == [64] * 4
    assert info.module_name() == ["neck.convs.0", "neck.convs.1", "neck.convs.2", "neck.extra_convs.0"]
    assert not any(k.startswith(("model.encoder.", "model.decoder.", "model.class_embed.")) for k in feats.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = feats(x)
        expect = full.forward_neck(x)
        out, inter = full.forward_intermediates(x, indices=[1, 3])
    assert [tuple(f.shape) for f in maps] == [(2, 64, math.ceil(64 / s), math.ceil(96 / s)) for s in (8, 16, 32, 64)]
    for a, b in zip(maps, expect):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(inter[0], expect[1])
    torch.testing.assert_close(inter[1], expect[3])
    with torch.no_grad():
        torch.testing.assert_close(out["pred_logits"], full(x)["pred_logits"])
    two = timm.create_model("focus_detr_tiny", features_only=True, out_indices=(0, 2))
    assert two.feature_info.reduction() == [8, 32] and len(two(x)) == 2
    with pytest.raises(UnsupportedError, match="pruned"):
        feats.model(x)


def test_reset_classifier_re_heads_and_trains():
    """A new label set of 3 classes: every class-logit layer (decoder layers and two-stage /
    OESM scorer) and the denoising label embedding are rebuilt; the model trains with them."""
    m = _tiny()
    keep = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("bbox_embed.", "fts."))}
    m.reset_classifier(3)
    assert m.num_classes == 3 and m.label_enc.weight.shape == (3, 64)
    assert all(c.weight.shape == (3, 64) for c in m.class_embed) and len(m.class_embed) == 3
    for k, v in keep.items():
        assert torch.equal(m.state_dict()[k], v)
    targets = [dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])),
               dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]))]
    m.train()
    out = m(torch.randn(2, 3, 64, 64), targets=targets)
    assert out["pred_logits"].shape[-1] == 3 and out["enc_outputs"]["pred_logits"].shape[-1] == 3
    assert out["dn_outputs"]["pred_logits"].shape[-1] == 3
    losses = m.create_criterion()(out, targets, [(64, 64)] * 2)
    sum(losses.values()).backward()
    for p in [*m.class_embed.parameters(), m.label_enc.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        res = m.postprocess(m(torch.randn(1, 3, 64, 64)), [(64, 64)])
    assert int(res[0]["labels"].max()) < 3
    with pytest.raises(UnsupportedError, match="features_only"):
        m.reset_classifier(0)
    with pytest.raises(UnsupportedError, match="global pooling"):
        m.reset_classifier(3, "avg")


def test_data_config_and_torchscript():
    """An image model: timm's data config gives a working image transform; TorchScript is not
    supported and says what is."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    m = _tiny()
    cfg = resolve_data_config({}, model=m)
    assert cfg["input_size"] == (3, 128, 128) and cfg["interpolation"] == "bilinear"
    x = create_transform(**cfg)(Image.new("RGB", (160, 120)))
    assert tuple(x.shape) == (3, 128, 128)
    with pytest.raises(UnsupportedError, match="torch.compile"):
        torch.jit.script(m)


def _compile_model():
    torch.manual_seed(0)
    return timm.create_model("focus_detr_tiny", enc_layers=1, dec_layers=1, cascade=(1.0,), num_queries=20,
                             dn_number=4)


def _float_leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True (0 graph breaks) in eval and in training with denoising targets; outputs and
    parameter gradients equal eager's."""
    m = _compile_model()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    with torch.no_grad():
        for a, b in zip(_float_leaves(compiled(x)), _float_leaves(m(x))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    m.train()
    targets = [dict(labels=torch.tensor([1, 3]), boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])),
               dict(labels=torch.tensor([2]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]))]
    grads = []
    for fn in (m, compiled):
        m.zero_grad()
        torch.manual_seed(1)  # the same denoising noise
        out = fn(x, targets=targets)
        leaves = _float_leaves(out)
        sum((t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in leaves).backward()
        grads.append(({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, leaves))
    (ge, oe), (gc, oc) = grads
    for a, b in zip(oc, oe):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ge.keys() == gc.keys() and len(ge) > 50
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_torch_export_matches_eager():
    m = _compile_model().eval()
    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        for a, b in zip(_float_leaves(ep.module()(x)), _float_leaves(m(x))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_swin_form_compiles_and_exports():
    """The detectron2-style Swin backbone (pad-first windows, output norms, any image size) under
    torch.compile(fullgraph=True) and torch.export, at a size that is not a whole number of windows."""
    m = _tiny_swin().eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        ref = _float_leaves(m(x))
        # static shapes: earlier compiles of this forward at other sizes would make Dynamo trace the
        # window padding symbolically
        compiled = _float_leaves(torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=False)(x))
        exported = _float_leaves(torch.export.export(m, (x,)).module()(x))
    for out in (compiled, exported):
        assert len(out) == len(ref)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
