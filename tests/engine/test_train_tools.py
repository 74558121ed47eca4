"""End-to-end through the tools: train → resume → test → export → infer, on real digits."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import zoo.engine  # noqa: F401
from _engine_helpers import run_tool
from zoo.engine.compat import load_checkpoint_file


def _scalars(work: Path):
    (path,) = work.glob("*/vis_data/scalars.json")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_lowers_loss(trained):
    rows = _scalars(trained["work"])
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12  # 3 epochs x 4 iterations, logged every iteration
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    for ep in (1, 2, 3):
        assert (trained["work"] / f"epoch_{ep}.pth").is_file()
    ckpt = load_checkpoint_file(str(trained["work"] / "epoch_3.pth"))
    assert ckpt["meta"]["iter"] == 12 and ckpt["meta"]["epoch"] == 3
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert ckpt["meta"]["dataset_meta"]["classes"] == tuple(str(i) for i in range(10))


def test_resume_continues_with_same_state(trained, tmp_path):
    """Resuming from epoch 2 loads iteration 8 and the optimizer state: the resumed epoch 3 must
    equal the uninterrupted run's epoch 3 (same data order, same Adam moments)."""
    work = tmp_path / "resumed"
    ckpt2 = trained["work"] / "epoch_2.pth"
    proc = run_tool("train.py", trained["cfg"], "--work-dir", work, "--resume", ckpt2)
    log = proc.stdout + proc.stderr
    assert re.search(r"resumed epoch: 2, iter: 8", log), log[-3000:]
    assert not (work / "epoch_1.pth").exists() and not (work / "epoch_2.pth").exists()
    resumed = load_checkpoint_file(str(work / "epoch_3.pth"))
    straight = load_checkpoint_file(str(trained["work"] / "epoch_3.pth"))
    assert resumed["meta"]["iter"] == 12
    for k, v in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    s_opt, r_opt = straight["optimizer"]["state"], resumed["optimizer"]["state"]
    assert s_opt.keys() == r_opt.keys()
    for i in s_opt:
        assert int(s_opt[i]["step"]) == int(r_opt[i]["step"]) == 12
        torch.testing.assert_close(r_opt[i]["exp_avg_sq"], s_opt[i]["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def test_test_tool_reproduces_val_accuracy(trained, tmp_path):
    """--out x.pkl holds every sample's prediction (as mmpretrain's test tool writes them); the
    metrics recomputed from it equal those reported, which equal the last validation's."""
    import pickle

    from zoo.engine.datasets import DigitsDataset
    from zoo.engine.metrics import topk_accuracy
    out = tmp_path / "preds.pkl"
    proc = run_tool("test.py", trained["cfg"], trained["work"] / "epoch_3.pth", "--work-dir", tmp_path / "t",
                    "--out", out)
    val = [r for r in _scalars(trained["work"]) if "accuracy/top1" in r][-1]
    record = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert record["metrics"]["accuracy/top1"] == pytest.approx(val["accuracy/top1"], abs=1e-4)
    assert record["metrics"]["accuracy/top5"] == pytest.approx(val["accuracy/top5"], abs=1e-4)
    line = [l for l in proc.stdout.splitlines() if l.startswith("metrics: ")]
    assert line and json.loads(line[-1][len("metrics: "):]) == record["metrics"]
    preds = pickle.loads(out.read_bytes())
    ds = DigitsDataset("val", img_size=16)
    assert sorted(p["sample_idx"] for p in preds) == list(range(len(ds))) == list(range(360))
    assert all(p["gt_label"] == int(ds.labels[p["sample_idx"]]) for p in preds)
    assert all(int(p["pred_label"]) == int(p["pred_score"].argmax()) for p in preds)
    scores = torch.stack([p["pred_score"] for p in preds])
    labels = torch.tensor([p["gt_label"] for p in preds])
    again = topk_accuracy(scores, labels, (1, 5))
    assert again["top1"] == pytest.approx(record["metrics"]["accuracy/top1"], abs=1e-4)


def test_export_round_trip_gives_identical_logits(trained, tmp_path):
    """tools/export.py on a training checkpoint -> timm's Hub folder -> ``local-dir:`` gives the
    trained network back exactly."""
    from zoo.engine.model import TimmClassifier
    ckpt_path = trained["work"] / "epoch_3.pth"
    out = tmp_path / "out"
    run_tool("export.py", ckpt_path, out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # atomic write left no temp file
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    wrapper = TimmClassifier("test_resnet", num_classes=10)
    wrapper.load_state_dict(load_checkpoint_file(str(ckpt_path))["state_dict"])
    wrapper.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wrapper(x, mode="tensor"), rtol=0, atol=0)


def test_infer_prints_dataset_class_names(trained, tmp_path):
    from zoo.engine.datasets import DigitsDataset
    from zoo.engine.inference import run
    ds = DigitsDataset("val", img_size=16, in_chans=1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(ds[i]["inputs"][0].numpy()).save(folder / f"d{i}.png")
    proc = run_tool("infer.py", trained["work"] / "epoch_3.pth", folder, "--topk", "3")
    assert proc.stdout.count(".png") == 3 and proc.stdout.count("(class ") == 9, proc.stdout
    # the printed top-1 is the model's own prediction on the same pixels
    res = run(str(trained["work"] / "epoch_3.pth"), [str(folder)], topk=1, verbose=False)
    wrapper = zoo.engine.TimmClassifier("test_resnet", num_classes=10)
    wrapper.load_state_dict(load_checkpoint_file(str(trained["work"] / "epoch_3.pth"))["state_dict"])
    wrapper.eval()
    batch = torch.stack([ds[i]["inputs"].expand(3, -1, -1) for i in range(3)])
    pred = wrapper.predict(wrapper.data_preprocessor(dict(inputs=batch))["inputs"])
    assert [r["topk"][0]["name"] for r in res] == [str(int(p.pred_label)) for p in pred]


def _load_tool(name):
    import importlib
    return importlib.import_module(f"zoo.cli.{name}")


def test_test_tool_pretrained_name(trained, tmp_path):
    """--pretrained NAME evaluates published weights; here the 'published' file is our export,
    given to timm through the pretrained cfg overlay (no network)."""
    from zoo.engine.export import export_checkpoint
    path, _ = export_checkpoint(str(trained["work"] / "epoch_3.pth"), str(tmp_path / "exp"))
    tool = _load_tool("test")
    out = tmp_path / "m.json"
    metrics = tool.main([str(trained["cfg"]), "--pretrained", "test_resnet", "--work-dir", str(tmp_path / "w"),
                         "--out", str(out), "--out-item", "metrics", "--cfg-options",
                         f"model.model_kwargs.pretrained_cfg_overlay.file={path}",
                         "model.model_kwargs.pretrained_cfg_overlay.num_classes=10"])
    val = [r for r in _scalars(trained["work"]) if "accuracy/top1" in r][-1]
    assert metrics["accuracy/top1"] == pytest.approx(val["accuracy/top1"], abs=1e-4)
    assert json.loads(out.read_text()) == metrics
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["pretrained"] == "test_resnet"


def test_test_tool_bad_inputs(trained, tmp_path):
    tool = _load_tool("test")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        tool.main([str(trained["cfg"]), str(bad), "--work-dir", str(tmp_path / "w")])
    with pytest.raises(ValueError, match="unknown model name 'test_resnett'.*Did you mean: test_resnet"):
        tool.main([str(trained["cfg"]), "--pretrained", "test_resnett", "--work-dir", str(tmp_path / "w")])
    with pytest.raises(SystemExit):  # argparse: a model name given where a checkpoint belongs
        tool.main([str(trained["cfg"]), "test_resnet"])
    with pytest.raises(SystemExit):  # predictions go to a pickle
        tool.main([str(trained["cfg"]), str(trained["work"] / "epoch_3.pth"), "--out", str(tmp_path / "p.json")])


def test_train_tool_missing_data_root(tmp_path):
    """An ImageNet config pointing at a missing folder fails naming the folder."""
    from _engine_helpers import BASE
    cfg = tmp_path / "inet.py"
    cfg.write_text(f"_base_ = [{str(BASE / 'datasets/imagenet.py')!r}, {str(BASE / 'schedules/imagenet_adamw_300e.py')!r},"
                   f" {str(BASE / 'default_runtime.py')!r}]\n"
                   "model = dict(type='TimmClassifier', model_name='test_resnet', num_classes=10)\n"
                   f"train_dataloader = dict(num_workers=0, dataset=dict(data_root={str(tmp_path / 'nowhere')!r}))\n"
                   f"val_dataloader = dict(num_workers=0, dataset=dict(data_root={str(tmp_path / 'nowhere')!r}))\n"
                   "test_dataloader = val_dataloader\n")
    proc = run_tool("train.py", cfg, "--work-dir", tmp_path / "w", "--cfg-options", "train_cfg.max_epochs=1",
                    check=False)
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere") in proc.stderr and "does not exist" in proc.stderr
