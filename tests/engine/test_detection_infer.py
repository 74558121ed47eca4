"""tools/infer.py on a Focus-DETR detector: task chosen from the model, boxes in input pixels,
score threshold / top-k, drawn PNG and JSON output."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import zoo.engine  # noqa: F401  (registers the detection handler)
from _engine_helpers import run_tool
from zoo.engine.detection_infer import _PALETTE, detect, draw_detections
from zoo.engine.inference import OUTPUT_HANDLERS, load_model


def _load_tool(name):
    import importlib.util

    from _engine_helpers import TOOLS
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _detection_handler():
    """test_engine_units' handler test registers and pops a dummy 'detection' handler; make sure
    the real one is in place whatever ran before."""
    from zoo.engine import detection_infer
    OUTPUT_HANDLERS["detection"] = (detection_infer.detect, detection_infer._print_detections)


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
    infer = _load_tool("infer")
    res = infer.main([str(tiny["weights"]), str(tiny["img"]), "--model", "focus_detr_tiny", "--out-dir", str(out_dir)])
    assert res[0]["detections"] == [] and res[0]["output"] == str(png) and png.is_file()
    bad = run_tool("infer.py", tiny["weights"], tiny["img"], "--model", "focus_detr_tiny", "--score-thr", "2",
                   check=False)
    assert bad.returncode != 0 and "--score-thr must be in [0, 1]" in bad.stderr
