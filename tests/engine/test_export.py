"""tools/export.py writes timm's Hub folder and ``local-dir:`` rebuilds the trained model exactly;
tools/infer.py reads such a folder (its input size and labels), 16-bit images and bad files."""
import json
import os
import stat

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import zoo  # noqa: F401
from zoo.cli import export as export_cli
from zoo.cli import infer as infer_cli
from zoo.engine.export import export_checkpoint, export_model
from zoo.engine.inference import load_image, run

CLASSES = ["cat", "dog", "eel"]
CFG_TEXT = """
model = dict(type='TimmClassifier', model_name='pyramid_tnt_ti', num_classes=3)
test_dataloader = dict(batch_size=8, dataset=dict(type='DigitsDataset', split='val', img_size=32, in_chans=3))
"""


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tools/train.py-style checkpoint of a 3-class PyramidTNT-Ti trained at 32 px (random weights)."""
    torch.manual_seed(0)
    net = timm.create_model("pyramid_tnt_ti", num_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = dict(state_dict={f"model.{k}": v for k, v in net.state_dict().items()},
                meta=dict(cfg=CFG_TEXT, dataset_meta=dict(classes=CLASSES)))
    path = tmp_path_factory.mktemp("train") / "epoch_3.pth"
    torch.save(ckpt, path)
    return net, path


def test_export_folder_round_trips_through_local_dir(trained, tmp_path):
    net, ckpt = trained
    out = tmp_path / "exported" / "digits_ptnt"
    path, info = export_checkpoint(str(ckpt), str(out))
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(os.listdir(out.parent)) == ["digits_ptnt"]  # no temporaries left beside it
    for f in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o666 & ~_umask(), f
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "pyramid_tnt_ti" and config["num_classes"] == 3
    assert config["label_names"] == CLASSES
    pc = config["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["crop_pct"] == 1.0 and pc["mean"] == [0.5, 0.5, 0.5]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: timm\n")
    assert "pipeline_tag: image-classification" in card and "## Intended uses and limitations" in card
    # the family's paper, cited from its cfg
    assert "## Citation" in card and "eprint        = {2201.00978}" in card and "PyramidTNT" in card
    assert info["input_size"] == (3, 32, 32) and path == str(out / "model.safetensors")

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert model.pretrained_cfg["label_names"] == CLASSES


def test_export_is_atomic_and_refuses_to_clobber(trained, tmp_path):
    _, ckpt = trained
    out = tmp_path / "e"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(str(ckpt), str(out))
    with pytest.raises(FileExistsError, match="not a previous export"):
        export_checkpoint(str(ckpt), str(out), overwrite=True)
    assert os.listdir(out) == ["notes.txt"]
    # a failure while writing leaves neither the folder nor a temporary
    with pytest.raises(ValueError, match="not serializable"):
        export_model(trained[0], str(tmp_path / "f"), model_args=dict(bad=object()))
    assert sorted(os.listdir(tmp_path)) == ["e"]
    # a previous export is replaced as a whole with --overwrite
    good = tmp_path / "g"
    export_cli.main([str(ckpt), str(good)])
    export_cli.main([str(ckpt), str(good), "--overwrite"])
    assert sorted(os.listdir(good)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["e", "g"]


def test_non_classifier_round_trip(tmp_path):
    """A 3-D segmenter: the exported folder keeps its volume input size and rebuilds exactly."""
    torch.manual_seed(1)
    net = timm.create_model("agunet_3d_small").eval()
    out = export_model(net, str(tmp_path / "seg"), card=dict(task="image-segmentation"))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32, 32]
    assert "pipeline_tag" not in open(os.path.join(out, "README.md")).read()
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        a, b = net(x), model(x)
    a = a if torch.is_tensor(a) else a[0]
    b = b if torch.is_tensor(b) else b[0]
    assert torch.equal(a, b)


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path)
    return str(path)


def test_infer_uses_the_folder_input_size_and_labels(trained, tmp_path):
    net, ckpt = trained
    out = tmp_path / "exp"
    export_checkpoint(str(ckpt), str(out))
    rng = np.random.default_rng(0)
    img = _png(tmp_path / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    res = run(str(out), [img], topk=3, verbose=False)
    # the expected answer: the trained net at the trained 32 px, normalised with mean = std = 0.5
    x = (torch.from_numpy(np.asarray(Image.open(img), dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
    with torch.no_grad():
        probs = net(x[None]).softmax(-1)[0]
    top = probs.topk(3)
    assert [t["name"] for t in res[0]["topk"]] == [CLASSES[i] for i in top.indices]
    assert res[0]["topk"][0]["score"] == pytest.approx(float(top.values[0]), abs=1e-5)
    # the bare weights file inside the folder is recognised too
    assert run(str(out / "model.safetensors"), [img], topk=3, verbose=False) == res


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = _png(tmp_path / "deep.png", ramp)
    assert Image.open(path).mode.startswith("I")
    img = np.asarray(load_image(path, "L"))
    assert (img == 255).mean() < 0.01  # PIL's own convert() clips most of these pixels to 255
    assert np.abs(img.astype(float) - ramp / 257.0).max() <= 0.5 + 1e-9
    rgb = np.asarray(load_image(path, "RGB"))
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], img)


def test_folder_with_one_bad_file_gives_partial_results(trained, tmp_path, capsys):
    _, ckpt = trained
    out = tmp_path / "exp"
    export_checkpoint(str(ckpt), str(out))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "c.png"):
        _png(imgs / name, rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    (imgs / "b.png").write_bytes(b"this is not a png")
    js = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        infer_cli.main([str(out), str(imgs), "--json", str(js)])
    assert "1 of 3 input files" in str(e.value.code) and "b.png" in str(e.value.code)
    results = json.loads(js.read_text())
    assert [os.path.basename(r["file"]) for r in results] == ["a.png", "b.png", "c.png"]
    assert "topk" in results[0] and "topk" in results[2]
    assert "cannot read image" in results[1]["error"] and "b.png" in results[1]["error"]
    captured = capsys.readouterr()
    assert "a.png" in captured.out and "c.png" in captured.out and "error: cannot read image" in captured.err
