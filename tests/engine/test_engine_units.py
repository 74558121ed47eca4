"""In-process checks of the mmengine glue: model, data, metric, compat fixes, error messages."""
import io
import os
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.structures import BaseDataElement

import zoo.engine  # noqa: F401
from zoo.engine import Accuracy, ClsDataPreprocessor, DigitsDataset, ImageFolderDataset, TimmClassifier
from zoo.engine.compat import guard_dataloaders, load_checkpoint_file
from zoo.engine.config_check import check_config
from zoo.engine.metrics import topk_accuracy

from _engine_helpers import BASE, REPO, tiny_config


# -- model ---------------------------------------------------------------------------------------
def test_preprocessor_uses_model_data_config():
    m = TimmClassifier("test_vit", num_classes=3, model_kwargs=dict(img_size=16, patch_size=8))
    dcfg = timm.data.resolve_data_config({}, model=m.model)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = m.data_preprocessor(dict(inputs=x, data_samples=None))["inputs"]
    ref = (x.float() / 255 - torch.tensor(dcfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(dcfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    # explicit statistics win over the model's
    pp = ClsDataPreprocessor(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(pp(dict(inputs=[t for t in x]))["inputs"], (x.float() / 255 - 0.5) / 0.25)


def _samples(labels):
    return [BaseDataElement(gt_label=int(l)) for l in labels]


def test_loss_predict_and_label_smoothing():
    torch.manual_seed(0)
    m = TimmClassifier("test_resnet", num_classes=10, label_smoothing=0.1).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    loss = m(x, _samples(y), mode="loss")
    assert set(loss) == {"loss"}
    torch.testing.assert_close(loss["loss"], F.cross_entropy(m.model(x), y, label_smoothing=0.1))
    preds = m(x, _samples(y), mode="predict")
    scores = m.model(x).softmax(-1)
    for p, s, l in zip(preds, scores, y):
        torch.testing.assert_close(p.pred_score, s)
        assert int(p.pred_label) == int(s.argmax()) and p.gt_label == int(l)
    with pytest.raises(ValueError, match="mode must be"):
        m(x, mode="bogus")


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_soft_targets(mixup, cutmix):
    m = TimmClassifier("test_resnet", num_classes=10, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4])  # odd batch works
    target = F.one_hot(y, 10).float() * 0.9 + 0.01
    np.random.seed(0)
    mixed, t = m._mix(x, target)
    assert mixed.shape == x.shape and torch.allclose(t.sum(-1), torch.ones(5))
    lam = float(t[0, 0] - 0.01) / 0.9  # sample 0 keeps lam of its own class, gets 1-lam of sample 4's
    assert 0.0 <= lam <= 1.0 and t[0, 4] == pytest.approx((1 - lam) * 0.9 + 0.01, abs=1e-5)
    if cutmix and not mixup:  # pasted pixels come verbatim from the rolled batch
        changed = (mixed != x).any(1)
        torch.testing.assert_close(mixed[0][:, changed[0]], x[4][:, changed[0]])
    loss = m(x, _samples(y), mode="loss")["loss"]
    assert torch.isfinite(loss)
    loss.backward()


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model name 'resnt18'.*Did you mean: resnet18"):
        TimmClassifier("resnt18", num_classes=10)


def _save_weights(tmp_path, name):
    src = timm.create_model(name)  # 1000 classes: the head is loaded too
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.123)  # unlike any fresh initialisation
    path = tmp_path / f"{name}.pth"
    torch.save(src.state_dict(), path)
    return src.state_dict(), str(path)


def test_pretrained_weights_survive_runner_init_weights(tmp_path):
    """Runner.train() calls model.init_weights(); timm models have their own init_weights, which
    mmengine's BaseModule calls on children unless marked initialised (mmengine#1335)."""
    ref, path = _save_weights(tmp_path, "test_resnet")
    kw = dict(model_kwargs=dict(pretrained_cfg_overlay=dict(file=path)))
    m = TimmClassifier("test_resnet", pretrained=True, num_classes=1000, **kw)
    m.init_weights()
    for k, v in ref.items():
        torch.testing.assert_close(m.model.state_dict()[k], v, msg=k)
    # control: without the flag the same call wipes the weights
    m2 = TimmClassifier("test_resnet", pretrained=True, num_classes=1000, **kw)
    m2.model.is_init = False
    m2.init_weights()
    wiped = [k for k, v in ref.items() if v.ndim == 4 and not torch.equal(m2.model.state_dict()[k], v)]
    assert len(wiped) == sum(v.ndim == 4 for v in ref.values())  # every conv re-initialised


# -- data ----------------------------------------------------------------------------------------
def test_digits_split_is_stratified_and_deterministic():
    tr, va = DigitsDataset("train", img_size=8, in_chans=1), DigitsDataset("val", img_size=8, in_chans=1)
    assert (len(tr), len(va)) == (1437, 360)
    counts = np.bincount(va.labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    from sklearn.datasets import load_digits
    d = load_digits()
    item = va[0]
    assert item["inputs"].dtype == torch.uint8 and item["inputs"].shape == (1, 8, 8)
    # val images are real sklearn digits, none of them in train
    flat = {bytes(x.numpy().tobytes()) for x in tr.images}
    assert sum(bytes(x.numpy().tobytes()) in flat for x in va.images) < 20  # (a few true duplicates exist)
    idx = int(np.where((np.round(d.images / 16 * 255) == item["inputs"][0].numpy()).all((1, 2)))[0][0])
    assert d.target[idx] == item["data_samples"].gt_label
    again = DigitsDataset("val", img_size=8, in_chans=1)
    assert torch.equal(again.images, va.images)
    rgb = DigitsDataset("val", img_size=20, in_chans=3)
    assert rgb[3]["inputs"].shape == (3, 20, 20) and torch.equal(rgb[3]["inputs"][0], rgb[3]["inputs"][2])
    with pytest.raises(ValueError, match="split must be one of"):
        DigitsDataset("valid")


def test_image_folder_dataset(tmp_path):
    from PIL import Image
    ds = DigitsDataset("val", img_size=24, in_chans=1)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(ds[i]["inputs"][0].numpy()).convert("RGB").save(tmp_path / split / c / f"{i}.png")
    val = ImageFolderDataset(str(tmp_path), "val", img_size=16, transform_kwargs=dict(crop_pct=1.0))
    assert len(val) == 4 and val.metainfo["classes"] == ("cat", "dog")
    item = val[3]
    assert item["inputs"].dtype == torch.uint8 and item["inputs"].shape == (3, 16, 16)
    assert item["data_samples"].gt_label == 1
    train = ImageFolderDataset(str(tmp_path), "train", img_size=16, transform_kwargs=dict(auto_augment="rand-m9-mstd0.5"))
    assert train[0]["inputs"].shape == (3, 16, 16)


def test_missing_data_root_names_the_path(tmp_path):
    missing = tmp_path / "no" / "imagenet"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolderDataset(str(missing), "train")


# -- metric --------------------------------------------------------------------------------------
def test_topk_accuracy_known_answer():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
    labels = torch.tensor([1, 2, 0, 0])
    # top1 hits: sample 0 only; top2: 0, 1, 2 ; top5 capped at 3 classes: all
    assert topk_accuracy(scores, labels, (1, 2, 5)) == {"top1": 25.0, "top2": 75.0, "top5": 100.0}
    metric = Accuracy(topk=(1, 2))
    metric.process(None, [dict(pred_score=s, gt_label=int(l)) for s, l in zip(scores, labels)])
    assert metric.compute_metrics(metric.results) == {"top1": 25.0, "top2": 75.0}


# -- compat: checkpoints under weights_only=True -------------------------------------------------
def test_mmengine_checkpoint_loads_with_weights_only(trained):
    path = str(trained["work"] / "epoch_1.pth")
    ckpt = torch.load(path, weights_only=True)  # torch's default since 2.6; allow-listed by zoo.engine
    hub = ckpt["message_hub"]["log_scalars"]
    assert type(next(iter(hub.values()))).__name__ == "HistoryBuffer"
    assert next(iter(hub.values())).mean() == next(iter(hub.values())).statistics("mean")


def test_allow_list_is_narrow():
    """The allow-listed getattr serves only HistoryBuffer's statistics methods, nothing else."""
    from mmengine.logging.history_buffer import HistoryBuffer

    class Ref:
        def __init__(self, obj, name):
            self.obj, self.name = obj, name

        def __reduce__(self):
            return (getattr, (self.obj, self.name))

    def roundtrip(obj):
        buf = io.BytesIO()
        torch.save({"x": obj}, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)["x"]

    assert roundtrip(Ref(HistoryBuffer, "mean")) is HistoryBuffer.mean
    for obj, name in ((HistoryBuffer, "__init__"), (np.ndarray, "tofile"), (HistoryBuffer, "__class__")):
        with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
            roundtrip(Ref(obj, name))
    class Call:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError):  # and other globals stay blocked
        roundtrip(Call())


def test_corrupted_checkpoint_gives_clear_error(trained, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes((trained["work"] / "epoch_1.pth").read_bytes()[:5000])
    with pytest.raises(RuntimeError, match=r"cannot read checkpoint .*bad\.pth.*corrupted"):
        load_checkpoint_file(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))


# -- config checks -------------------------------------------------------------------------------
def test_config_typos_are_reported(tmp_path):
    cfg = Config.fromfile(str(tiny_config(tmp_path / "a.py", extra="trian_cfg = dict(max_epochs=1)")))
    with pytest.raises(ValueError, match="unknown top-level key 'trian_cfg'; did you mean 'train_cfg'"):
        check_config(cfg, "a.py")
    cfg = Config.fromfile(str(tiny_config(tmp_path / "b.py", extra="model = dict(type='TimmClasifier')")))
    with pytest.raises(ValueError, match=r"model.type='TimmClasifier' is not registered.*'TimmClassifier'"):
        check_config(cfg, "b.py")
    cfg = Config.fromfile(str(tiny_config(tmp_path / "c.py", extra="optim_wrapper = dict(optimizer=dict(type='AdamX'))")))
    with pytest.raises(ValueError, match=r"optim_wrapper.optimizer.type='AdamX'.*'Adam"):
        check_config(cfg, "c.py")
    # helper variables that are not near-misses of Runner keys are fine
    check_config(Config.fromfile(str(tiny_config(tmp_path / "d.py", extra="img_size = 16"))), "d.py")


def test_base_configs_parse_and_build_optimizer():
    cfg = Config.fromfile(str(REPO / "configs" / "quickstart_digits.py"))
    check_config(cfg)
    assert cfg.model.model_name and cfg.train_dataloader.dataset.type == "DigitsDataset"
    cfg = Config.fromfile(str(BASE / "schedules" / "imagenet_adamw_300e.py"))
    check_config(cfg)
    assert cfg.train_cfg.max_epochs == 300 and cfg.param_scheduler[-1].end == 300
    from mmengine.optim import build_optim_wrapper
    model = TimmClassifier("test_vit", num_classes=10, model_kwargs=dict(img_size=16, patch_size=8))
    ow = build_optim_wrapper(model, cfg.optim_wrapper)
    groups = ow.optimizer.param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.model.pos_embed) not in decayed and id(model.model.head.bias) not in decayed
    assert id(model.model.head.weight) in decayed
    cfg = Config.fromfile(str(BASE / "datasets" / "imagenet.py"))
    check_config(cfg)


def test_persistent_workers_guard():
    cfg = Config(dict(train_dataloader=dict(num_workers=0, persistent_workers=True),
                      val_dataloader=dict(num_workers=2, persistent_workers=True)))
    guard_dataloaders(cfg)
    assert cfg.train_dataloader.persistent_workers is False and cfg.val_dataloader.persistent_workers is True


def test_infer_class_names():
    from zoo.engine.inference import OUTPUT_HANDLERS, class_names, register_output_handler
    inet = timm.create_model("test_resnet")  # 1000 classes -> ImageNet descriptions
    names = class_names(inet, dict(classes=None))
    assert len(names) == 1000 and names[0].startswith("tench") and names[1].startswith("goldfish")
    small = timm.create_model("test_resnet", num_classes=3)
    assert class_names(small, dict(classes=["a", "b", "c"])) == ["a", "b", "c"]
    assert class_names(small, dict(classes=None)) == ["0", "1", "2"]
    previous = OUTPUT_HANDLERS.get("detection")
    register_output_handler("detection", lambda *a, **k: [], lambda r: None)
    try:
        assert "detection" in OUTPUT_HANDLERS
    finally:
        if previous is None:
            OUTPUT_HANDLERS.pop("detection")
        else:
            OUTPUT_HANDLERS["detection"] = previous


def test_hard_distillation_loss_and_teacher_kept_out_of_state():
    import torch
    import torch.nn.functional as F
    from mmengine.structures import BaseDataElement
    from zoo.engine import TimmClassifier

    torch.manual_seed(0)
    m = TimmClassifier("resnet10t", num_classes=10,
                       distillation=dict(teacher="resnet10t", pretrained=False, type="hard", alpha=0.5))
    assert not any(k.startswith("_teacher") for k in m.state_dict())
    assert all(not n.startswith("_teacher") for n, _ in m.named_parameters())
    x = torch.randn(4, 3, 32, 32)
    samples = []
    for y in [1, 2, 3, 4]:
        ds = BaseDataElement()
        ds.set_field(torch.tensor(y), "gt_label")
        samples.append(ds)
    loss = m.loss(x, samples)["loss"]
    logits = m.model(x)
    t = m.__dict__["_teacher"](x).argmax(-1)
    want = 0.5 * F.cross_entropy(logits, torch.tensor([1, 2, 3, 4])) + 0.5 * F.cross_entropy(logits, t)
    torch.testing.assert_close(loss, want)


def test_distillation_config_errors():
    import pytest
    from zoo.engine import TimmClassifier
    with pytest.raises(ValueError, match="teacher"):
        TimmClassifier("resnet10t", num_classes=10, distillation=dict(type="hard"))
    with pytest.raises(ValueError, match="hard"):
        TimmClassifier("resnet10t", num_classes=10, distillation=dict(teacher="resnet10t", type="medium", pretrained=False))


def test_mix_prob_leaves_some_batches_unmixed():
    import numpy as np
    import torch
    from zoo.engine import TimmClassifier

    x = torch.randn(4, 3, 16, 16)
    t = torch.eye(4)
    m = TimmClassifier("resnet10t", num_classes=4, mixup_alpha=1.0, mix_prob=0.0)
    xo, to = m._mix(x, t)
    assert xo is x and to is t
    m = TimmClassifier("resnet10t", num_classes=4, mixup_alpha=1.0, mix_prob=0.5)
    np.random.seed(0)
    mixed = [m._mix(x, t)[0] is not x for _ in range(200)]
    assert 60 < sum(mixed) < 140
    import pytest
    with pytest.raises(ValueError, match="mix_prob"):
        TimmClassifier("resnet10t", num_classes=4, mix_prob=1.5)
