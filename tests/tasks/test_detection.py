"""Detection task: box-aware transforms, padding preprocessor, COCO metric on pycocotools, the
embedded digits set, the detector wrapper, configs, tools/test.py printing the 12 COCO stats, and
tools/infer.py on a detector (task chosen from the model, boxes in input pixels, score threshold /
top-k, drawn PNG and JSON output)."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mmengine.config import Config
from mmengine.structures import BaseDataElement, InstanceData
from PIL import Image

from _engine_helpers import run_tool

from zoo.engine.inference import OUTPUT_HANDLERS, load_model
from zoo.registry import DATASETS, METRICS, MODELS
from zoo.tasks import detection
from zoo.tasks.detection import (COCO_STAT_NAMES, CocoDetection, CocoMetric, DetDataPreprocessor, DigitsDetection,
                                 TimmDetector, _PALETTE, detect, draw_detections, make_digits_detection_set,
                                 padding_masks)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
CFG_DIR = REPO / "configs" / "focus_detr"


def _write_coco(root: Path, rects, size=(60, 100), name="ann.json"):
    """One image with white rectangles (xyxy) on black; boxes = the rectangles."""

    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    anns = []
    for i, (x0, y0, x1, y1) in enumerate(rects):
        img[y0:y1, x0:x1] = 255
        anns.append(dict(id=i + 1, image_id=1, category_id=7, bbox=[x0, y0, x1 - x0, y1 - y0],
                         area=(x1 - x0) * (y1 - y0), iscrowd=0))
    (root / "imgs").mkdir(exist_ok=True)
    Image.fromarray(img).save(root / "imgs" / "a.png")
    (root / name).write_text(json.dumps(dict(images=[dict(id=1, file_name="a.png", height=h, width=w)],
                                             annotations=anns,
                                             categories=[dict(id=7, name="box"), dict(id=9, name="other")])))
    return root / name


def _white_extent(img: torch.Tensor):
    ys, xs = torch.nonzero(img[0] > 127, as_tuple=True)
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


@pytest.mark.parametrize("mode", ["resize", "flip", "letterbox"])
def test_transforms_keep_boxes_on_the_pixels(tmp_path, mode):
    ann = _write_coco(tmp_path, [(20, 10, 50, 40)])
    kw = dict(resize=dict(scales=(90,), max_size=200), flip=dict(scales=(120,), max_size=None, flip_prob=1.0),
              letterbox=dict(letterbox=64))[mode]
    ds = CocoDetection(str(tmp_path), "ann.json", "imgs", **kw)
    item = ds[0]
    img, s = item["inputs"], item["data_samples"]
    assert img.dtype == torch.uint8 and tuple(img.shape[-2:]) == s.img_shape
    box = s.gt_instances.bboxes[0]
    ext = torch.tensor(_white_extent(img), dtype=torch.float32)
    assert (box - ext).abs().max() <= 1.5, (box, ext)
    assert s.gt_instances.labels.tolist() == [0]  # category 7 -> contiguous label 0
    assert s.flip == (mode == "flip")
    if mode == "letterbox":
        assert max(s.img_shape) == 64
    assert ds.metainfo["cat_ids"] == (7, 9)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root"):
        CocoDetection(str(tmp_path / "nope"))
    cfg = Config.fromfile(str(CFG_DIR / "focus_detr_r50_4scale_12ep.py"))
    cfg.train_dataloader.dataset.data_root = str(tmp_path / "no_coco")
    with pytest.raises(FileNotFoundError, match="instances_"):
        DATASETS.build(cfg.train_dataloader.dataset)


def test_preprocessor_pads_and_masks():
    pp = DetDataPreprocessor(size_divisor=32)
    a = torch.full((3, 40, 50), 255, dtype=torch.uint8)
    b = torch.zeros((3, 70, 20), dtype=torch.uint8)
    samples = [BaseDataElement(metainfo=dict(img_shape=(40, 50))), BaseDataElement(metainfo=dict(img_shape=(70, 20)))]
    out = pp(dict(inputs=[a, b], data_samples=samples))
    x = out["inputs"]
    assert x.shape == (2, 3, 96, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(x[0, :, :40, :50], ((1 - mean) / std).expand(3, 40, 50))
    assert (x[0, :, 40:] == 0).all() and (x[0, :, :, 50:] == 0).all()
    m = padding_masks(out["data_samples"], x.shape[-2:], x.device)
    assert m.shape == (2, 96, 64)
    assert not m[0, :40, :50].any() and m[0, 40:].all() and m[0, :, 50:].all()
    assert not m[1, :70, :20].any() and m[1, 70:].all()


def _metric_on(tmp_path, preds):
    ann = _write_coco(tmp_path, [(20, 10, 50, 40), (60, 5, 90, 30)])
    metric = CocoMetric()
    metric.dataset_meta = dict(classes=("box", "other"), cat_ids=(7, 9), ann_file=str(ann))
    ds = BaseDataElement(metainfo=dict(img_id=1, ori_shape=(60, 100), img_shape=(60, 100)))
    ds.pred_instances = InstanceData(**preds)
    metric.process({}, [ds])
    return metric.evaluate(1)


def test_coco_metric_perfect_empty_and_wrong(tmp_path):
    perfect = _metric_on(tmp_path, dict(bboxes=torch.tensor([[20., 10., 50., 40.], [60., 5., 90., 30.]]),
                                        scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 0])))
    assert list(perfect) == [f"coco/{n}" for n in COCO_STAT_NAMES] and len(perfect) == 12
    assert perfect["coco/bbox_mAP"] == pytest.approx(1.0) and perfect["coco/bbox_AR_100"] == pytest.approx(1.0)
    empty = _metric_on(tmp_path, dict(bboxes=torch.zeros(0, 4), scores=torch.zeros(0),
                                      labels=torch.zeros(0, dtype=torch.long)))
    assert len(empty) == 12 and all(v == 0.0 for v in empty.values())
    half = _metric_on(tmp_path, dict(bboxes=torch.tensor([[20., 10., 50., 40.], [0., 50., 10., 60.]]),
                                     scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 0])))
    assert 0.3 < half["coco/bbox_mAP"] < 0.7  # one of two boxes found


def test_coco_metric_without_ann_file_uses_samples():
    metric = CocoMetric()
    metric.dataset_meta = dict(classes=("a", "b"), cat_ids=(1, 2))
    ds = BaseDataElement(metainfo=dict(img_id=3, ori_shape=(50, 50), img_shape=(100, 100), scale_factor=(2.0, 2.0)))
    ds.gt_instances = InstanceData(bboxes=torch.tensor([[20., 20., 60., 80.]]), labels=torch.tensor([1]))
    ds.pred_instances = InstanceData(bboxes=torch.tensor([[10., 10., 30., 40.]]), scores=torch.tensor([0.5]),
                                     labels=torch.tensor([1]))
    metric.process({}, [ds])
    assert metric.evaluate(1)["coco/bbox_mAP"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "set"
    DigitsDetection("train", data_root=str(root), num_train=4, num_val=2)
    return root


def test_digits_set_is_deterministic_and_real(tmp_path, digits_root):
    a = make_digits_detection_set(str(tmp_path / "a"), num_train=4, num_val=2)
    ja, jb = json.loads(Path(a["train"]).read_text()), json.loads((digits_root / "train.json").read_text())
    assert ja == jb and len(ja["annotations"]) >= 4
    assert (tmp_path / "a" / "train" / "00000.png").read_bytes() == (digits_root / "train" / "00000.png").read_bytes()
    ds = DigitsDetection("train", data_root=str(digits_root))
    item = ds[0]
    boxes = item["data_samples"].gt_instances.bboxes
    img = item["inputs"].float()
    for x0, y0, x1, y1 in boxes.round().long().tolist():  # ink inside every box is brighter than background
        assert img[:, y0:y1, x0:x1].max() > img.mean() + 60


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return TimmDetector("focus_detr_tiny", num_classes=10)


def _batch(root):
    ds = DigitsDetection("train", data_root=str(root))
    return [ds[i] for i in range(2)]


def test_wrapper_loss_and_predict(detector, digits_root):
    from mmengine.dataset import pseudo_collate

    data = pseudo_collate(_batch(digits_root))
    data = detector.data_preprocessor(data, True)
    detector.train()
    losses = detector(**data, mode="loss")
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_enc", "loss_class_dn", "loss_fg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    detector.eval()
    preds = detector(**data, mode="predict")
    for ds in preds:
        p = ds.pred_instances
        h0, w0 = ds.ori_shape
        assert p.bboxes.shape == (100, 4) and p.scores.shape == (100,)
        assert (p.bboxes[:, 0::2] <= w0).all() and (p.bboxes[:, 1::2] <= h0).all()
    with pytest.raises(ValueError, match="mode"):
        detector(**data, mode="bogus")


def test_wrapper_rejects_classifiers():
    with pytest.raises(TypeError, match="not a zoo detector"):
        TimmDetector("resnet10t", num_classes=10)


def test_short_training_raises_map_above_zero(digits_root):
    """30 AdamW steps on the 4 embedded training images (fixed seed) take COCO mAP on them from 0
    to above 0 and lower the loss (measured: mAP 0.12 after 30 steps, 0.69 after 60)."""
    from mmengine.dataset import pseudo_collate

    torch.manual_seed(0)
    ds = DigitsDetection("train", data_root=str(digits_root))
    items = [ds[i] for i in range(len(ds))]
    det = TimmDetector("focus_detr_tiny", num_classes=10)
    opt = torch.optim.AdamW([p for p in det.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)

    def coco_map():
        det.eval()
        preds = det(**det.data_preprocessor(pseudo_collate(items), False), mode="predict")
        metric = CocoMetric()
        metric.dataset_meta = ds.metainfo
        metric.process({}, preds)
        return metric.evaluate(len(items))["coco/bbox_mAP"]

    before = coco_map()
    hist = []
    for _ in range(30):
        det.train()
        losses = det(**det.data_preprocessor(pseudo_collate(items), True), mode="loss")
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(det.parameters(), 0.1)
        opt.step()
        hist.append(float(total.detach()))
    after = coco_map()
    assert before < 0.01 and after > 0.0, (before, after)
    assert np.mean(hist[-5:]) < 0.9 * np.mean(hist[:5]), hist


@pytest.mark.parametrize("name", ["focus_detr_r50_4scale_12ep", "focus_detr_r50_4scale_24ep",
                                  "focus_detr_r50_4scale_36ep", "focus_detr_tiny_digits"])
def test_configs_load(name):
    cfg = Config.fromfile(str(CFG_DIR / f"{name}.py"))
    assert cfg.model.type == "TimmDetector"
    assert MODELS.get("TimmDetector") is not None and METRICS.get("CocoMetric") is not None
    if "r50" in name:
        assert cfg.optim_wrapper.optimizer.lr == 1e-4 and cfg.optim_wrapper.clip_grad.max_norm == 0.1
        assert cfg.optim_wrapper.paramwise_cfg.custom_keys["model.backbone"]["lr_mult"] == 0.1
        assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
        temp = cfg.model.model_kwargs.pos_temperature
        assert temp == (10000 if "12ep" in name else 20)
        import timm
        kw = dict(cfg.model.model_kwargs, backbone_pretrained=False)  # no network in tests
        assert cfg.model.model_kwargs.backbone_pretrained and kw["backbone"] == "resnet50.tv_in1k"
        with torch.device("meta"):
            m = timm.create_model(cfg.model.model_name, num_classes=cfg.model.num_classes, **kw)
        assert m.num_queries == 900 and m.cascade == (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)


def test_tools_test_prints_12_coco_stats(tmp_path, capsys):
    """tools/test.py builds everything from the config (registered dataset, model and metric)."""

    cfg = Config.fromfile(str(CFG_DIR / "focus_detr_tiny_digits.py"))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "tiny.pth"
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    root = tmp_path / "digits"
    from zoo.cli import test as tool
    tool.main([str(CFG_DIR / "focus_detr_tiny_digits.py"), str(ckpt), "--work-dir", str(tmp_path / "w"),
               "--cfg-options", f"test_dataloader.dataset.data_root={root}", "test_dataloader.dataset.num_train=4",
               "test_dataloader.dataset.num_val=6", f"val_dataloader.dataset.data_root={root}"])
    out = capsys.readouterr()
    line = [l for l in out.out.splitlines() if l.startswith("metrics: ")][-1]
    metrics = json.loads(line[len("metrics: "):])
    assert [k for k in metrics if k.startswith("coco/")] == [f"coco/{n}" for n in COCO_STAT_NAMES]
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())
    assert "Average Precision" in out.out + out.err


# -- tools/infer.py on a detector ------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _detection_handler():
    """test_engine_units' handler test registers and pops a dummy 'detection' handler; make sure
    the real one is in place whatever ran before."""
    OUTPUT_HANDLERS["detection"] = (detection.detect, detection._print_detections)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """focus_detr_tiny with random weights saved as safetensors, and a 120 x 90 photo."""
    from safetensors.torch import save_file
    from skimage import data

    root = tmp_path_factory.mktemp("det_infer")
    torch.manual_seed(0)
    model = timm.create_model("focus_detr_tiny").eval()
    weights = root / "focus_detr_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    img = root / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((120, 90)).save(img)
    return dict(root=root, weights=weights, img=img, model=model)


def test_task_defaults_to_detection(tiny):
    model, info = load_model(str(tiny["weights"]), "focus_detr_tiny")
    assert info["task"] == "detection" and "detection" in OUTPUT_HANDLERS
    assert model.num_classes == 10
    for a, b in zip(model.state_dict().values(), tiny["model"].state_dict().values()):
        assert torch.equal(a, b)


def test_boxes_match_model_at_native_size(tiny, tmp_path):
    # 128 x 96 is already the tiny cfg's inference size (short 128, long <= 128) and a multiple of 32,
    # so the handler's boxes must equal the network's own postprocess on the normalised image.
    model = tiny["model"]
    arr = np.array(Image.open(tiny["img"]).resize((128, 96)))
    path = tmp_path / "native.png"
    Image.fromarray(arr).save(path)
    res = detect(model, dict(classes=None), [str(path)], topk=7, score_thr=0.0, out_dir=None)[0]
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(model.pretrained_cfg["mean"]), torch.tensor(model.pretrained_cfg["std"])
    x = ((x - mean.view(3, 1, 1)) / std.view(3, 1, 1))[None]
    with torch.no_grad():
        ref = model.postprocess(model(x, torch.zeros(1, 96, 128, dtype=torch.bool)), [(96, 128)])[0]
    assert len(res["detections"]) == 7 and "output" not in res
    got_scores = torch.tensor([d["score"] for d in res["detections"]])
    torch.testing.assert_close(got_scores, ref["scores"][:7].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor([d["box"] for d in res["detections"]]),
                               ref["boxes"][:7].float(), atol=0.011, rtol=0)  # boxes rounded to 0.01 px
    assert [d["label"] for d in res["detections"]] == ref["labels"][:7].tolist()
    assert all(d["name"] == str(d["label"]) for d in res["detections"])


def test_threshold_and_errors(tiny):
    model = tiny["model"]
    res = detect(model, {}, [str(tiny["img"])], topk=100, score_thr=0.0, out_dir=None)[0]
    scores = [d["score"] for d in res["detections"]]
    assert len(scores) == 100 and scores == sorted(scores, reverse=True)
    thr = scores[10]
    kept = detect(model, {}, [str(tiny["img"])], topk=100, score_thr=thr, out_dir=None)[0]["detections"]
    assert all(d["score"] >= thr for d in kept) and len(kept) == sum(s >= thr for s in scores)
    for d in res["detections"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= 120 and 0 <= y0 <= y1 <= 90
    with pytest.raises(ValueError, match="score threshold"):
        detect(model, {}, [str(tiny["img"])], score_thr=1.5)
    with pytest.raises(TypeError, match="postprocess"):
        detect(timm.create_model("test_resnet"), {}, [str(tiny["img"])])


def test_draw_detections(tmp_path):
    img = Image.new("RGB", (60, 40), (255, 255, 255))
    out = draw_detections(img, [dict(label=3, name="cat", score=0.9, box=[10.0, 20.0, 50.0, 35.0])],
                          str(tmp_path / "d.png"))
    px = np.asarray(Image.open(out))
    assert px.shape == (40, 60, 3)
    assert tuple(px[35, 30]) == _PALETTE[3] and tuple(px[28, 10]) == _PALETTE[3]  # bottom and left edges
    assert tuple(px[28, 30]) == (255, 255, 255)  # inside stays untouched


def test_infer_tool_detection(tiny, tmp_path):
    out_dir, js = tmp_path / "out", tmp_path / "det.json"
    proc = run_tool("infer.py", tiny["weights"], tiny["img"], "--model-name", "focus_detr_tiny",
                    "--out-dir", out_dir, "--score-thr", "0", "--topk", "3", "--json", js)
    png = out_dir / "astronaut_det.png"
    assert png.is_file() and Image.open(png).size == (120, 90)
    res = json.loads(js.read_text())
    assert len(res) == 1 and res[0]["width"] == 120 and res[0]["height"] == 90
    assert res[0]["output"] == str(png)
    dets = res[0]["detections"]
    assert len(dets) == 3
    for d in dets:
        assert set(d) == {"label", "name", "score", "box"} and len(d["box"]) == 4
        assert 0 <= d["label"] < 10 and 0.0 <= d["score"] <= 1.0
        assert f"{d['name']} (class {d['label']}): {d['score']:.3f}" in proc.stdout
    assert "3 detections" in proc.stdout
    # default threshold 0.3 (in-process: a second interpreter start costs ~10 s): random heads
    # (prior bias -> sigmoid ~0.01) give no boxes, the drawing is still written
    png.unlink()
    from zoo.cli import infer
    res = infer.main([str(tiny["weights"]), str(tiny["img"]), "--model", "focus_detr_tiny", "--out-dir", str(out_dir)])
    assert res[0]["detections"] == [] and res[0]["output"] == str(png) and png.is_file()
    bad = run_tool("infer.py", tiny["weights"], tiny["img"], "--model", "focus_detr_tiny", "--score-thr", "2",
                   check=False)
    assert bad.returncode != 0 and "--score-thr must be in [0, 1]" in bad.stderr
