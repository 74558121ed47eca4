"""The two-phase Sparsifiner recipe (zoo.recipes.sparsifiner): phase losses, trainable sets and
the LV-ViT distillation views."""
import torch
import torch.nn.functional as F


def test_phases_losses():
    from mmengine.structures import BaseDataElement

    from zoo.recipes.sparsifiner import SparsifinerClassifier
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


def test_lvvit_distillation_views_and_pruning():
    from mmengine.structures import BaseDataElement

    from zoo.recipes.sparsifiner import SparsifinerClassifier
    torch.manual_seed(0)
    kw = dict(model_name="sparsifiner_lvvit_s_224", num_classes=5,
              model_kwargs=dict(img_size=32, embed_dim=32, depth=2, num_heads=2,
                                token_pruning_loc=(0,), token_keep_rate_base=0.5))
    x = torch.randn(2, 3, 32, 32)
    ds = [BaseDataElement(gt_label=torch.tensor(i)) for i in (1, 3)]
    p2 = SparsifinerClassifier(phase="backbone", **kw).train()
    out = p2.model.forward_aux(x)
    assert out["aux_logits"].shape == (2, 2, 5) and out["cls_logits"].shape == (2, 5)
    t = p2.teacher.forward_aux(x)
    assert t["aux_logits"].shape == (2, 4, 5) and "token_index" not in t      # dense teacher: no pruning
    losses = p2.loss(x, ds)
    assert set(losses) == {"loss_cls", "loss_kd", "loss_token"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in p2.parameters() if p.requires_grad)
    assert p2.model.aux_head.weight.grad.abs().sum() > 0
    # upstream's views: KL on the cls-token head alone, MSE on the aux logits at the kept tokens
    p2.eval()
    with torch.no_grad():
        s, t = p2.model.forward_aux(x), p2.teacher.forward_aux(x)
        t_aux = t["aux_logits"].gather(1, s["token_index"][..., None].expand(-1, -1, 5))
        losses = p2.loss(x, ds)
    torch.testing.assert_close(losses["loss_token"], 0.5 * F.mse_loss(s["aux_logits"], t_aux))
    kd = F.kl_div(F.log_softmax(s["cls_logits"], -1), F.log_softmax(t["cls_logits"], -1), reduction="batchmean",
                  log_target=True)
    torch.testing.assert_close(losses["loss_kd"], 0.5 * kd)
