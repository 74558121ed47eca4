"""Inputs at the edges of what the image classifiers accept: an empty batch is a clear error (the
token reshapes cannot represent it), and CPU bfloat16 autocast runs (and stays close to fp32)."""
import pytest
import timm
import torch

import zoo  # noqa: F401

# (model, input size): small variants at small sizes, so the whole file runs in seconds
EMPTY_BATCH = [("halonet_h0", 64), ("tnt_s_patch16_224_zoo", 32), ("pyramid_tnt_ti", 64),
               ("sparsifiner_deit_tiny_patch16_224", 32)]


@pytest.mark.parametrize("name,size", EMPTY_BATCH)
def test_empty_batch_is_a_clear_error(name, size):
    model = timm.create_model(name, num_classes=7, img_size=size).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 3, size, size))
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 7)


def test_sparsifiner_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_deit_tiny_patch16_224", num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("name,kw", [("tnt_s_patch16_224_zoo", dict(depth=1, img_size=32)),
                                     ("sparsifiner_deit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8))])
def test_attention_dropout_only_in_training(name, kw):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5, **kw)
    dropped = timm.create_model(name, num_classes=5, attn_drop_rate=0.3, **kw)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))    # eval: no dropout
        dropped.train()
        torch.manual_seed(1)
        a = dropped(x)
        torch.manual_seed(1)
        b = dropped(x)
        torch.manual_seed(2)
        c = dropped(x)
    torch.testing.assert_close(a, b)                                      # seeded: reproducible
    assert not torch.allclose(a, c)                                       # a different mask
