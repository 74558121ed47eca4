"""3-D segmentation glue: metrics (known answers), preprocessing, datasets, the model wrapper and
NIfTI inference."""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.structures import BaseDataElement

nib = pytest.importorskip("nibabel")  # optional dependency ([medical] extra); installed in CI

from zoo.tasks.seg3d import (EmbeddedMRISegDataset, NiftiSegDataset, SegDetectionMetric, Segmentation3DModel,  # noqa: E402
                              detection_stats, dice_score, infer_nifti, make_embedded_mri_set, normalize_intensity,
                              resample_isotropic, soft_dice_loss)

TINY = dict(filters=(4, 8, 16, 32, 32))


def test_dice_known_answers():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True  # 32 voxels
    b[1:3] = True  # 32 voxels, 16 shared
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(a, a) == 1.0 and dice_score(b * 0, b * 0) == 1.0 and dice_score(a, a * 0) == 0.0


def test_detection_stats_patient_wise():
    # cases: detected, missed (with a wrong prediction elsewhere), missed (nothing), empty+FP, empty+TN
    s = detection_stats([0.8, 0.05, 0.0, 0.0, 1.0], [True, True, True, False, False],
                        [True, True, False, True, False], dice_threshold=0.1)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 2)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(1 / 3)


def test_metric_through_process_and_compute():
    metric = SegDetectionMetric(dice_threshold=0.1)
    gt1 = torch.zeros(4, 4, 4, dtype=torch.long)
    gt1[:2] = 1
    pred1 = torch.zeros_like(gt1)
    pred1[1:3] = 1
    empty = torch.zeros_like(gt1)
    samples = [dict(gt_mask=gt1, pred_mask=pred1), dict(gt_mask=empty, pred_mask=empty),
               dict(gt_mask=gt1, pred_mask=empty)]
    metric.process(None, samples)
    out = metric.compute_metrics(metric.results)
    assert out["dice"] == pytest.approx(0.25) and out["dice_tp"] == pytest.approx(0.5)
    assert out["precision"] == 1.0 and out["recall"] == pytest.approx(0.5) and out["f1"] == pytest.approx(2 / 3)
    assert out["dice_all"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dice_threshold"):
        SegDetectionMetric(dice_threshold=2)


def test_soft_dice_loss():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.stack([(1 - target) * 30.0, target * 30.0], 1).float()
    assert float(soft_dice_loss(perfect, target, smooth=0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(-perfect, target, smooth=0.0)) == pytest.approx(1.0, abs=1e-6)


def test_preprocessing_isotropic_and_normalise():
    vol = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    iso = resample_isotropic(vol, (1.0, 1.0, 2.0))
    assert tuple(iso.shape) == (4, 4, 4)
    n = normalize_intensity(torch.tensor([0.0, 1.0, 2.0, 100.0]), (0, 75))
    assert float(n.min()) == 0.0 and float(n.max()) == 1.0


def test_embedded_set_is_deterministic_with_known_masks():
    a = make_embedded_mri_set(3, 16, seed=5)
    b = make_embedded_mri_set(3, 16, seed=5)
    for (ia, ma), (ib, mb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
        assert ia.shape == (1, 16, 16, 16) and 0 <= float(ia.min()) and float(ia.max()) <= 1
        if ma.any():  # lesions are brighter than the rest
            assert float(ia[0][ma.bool()].mean()) > float(ia[0][~ma.bool()].mean())
    ds = EmbeddedMRISegDataset("val", size=16, num_samples=2)
    item = ds[0]
    assert item["inputs"].shape == (1, 16, 16, 16) and item["data_samples"].gt_mask.shape == (16, 16, 16)
    with pytest.raises(ValueError, match="split"):
        EmbeddedMRISegDataset("test")


def _write_case(root, split, name, rng):
    vol = rng.rand(12, 10, 6).astype(np.float32) * 100
    lab = np.zeros((12, 10, 6), np.uint8)
    lab[4:8, 3:6, 2:4] = 1
    vol[lab > 0] += 200
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    for sub, arr in (("images", vol), ("labels", lab)):
        d = osp.join(root, split, sub)
        import os
        os.makedirs(d, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, aff), osp.join(d, f"{name}.nii.gz"))


def test_nifti_dataset_model_wrapper_and_inference(tmp_path):
    rng = np.random.RandomState(0)
    _write_case(str(tmp_path), "train", "case_a", rng)
    ds = NiftiSegDataset(str(tmp_path), "train", size=(8, 8, 8), augment=True)
    item = ds[0]
    assert item["inputs"].shape == (1, 8, 8, 8) and item["data_samples"].gt_mask.sum() > 0
    with pytest.raises(FileNotFoundError, match="images"):
        NiftiSegDataset(str(tmp_path), "val")

    torch.manual_seed(0)
    model = Segmentation3DModel("agunet_3d_small", model_kwargs=TINY)
    batch = model.data_preprocessor(dict(inputs=[item["inputs"]] * 2, data_samples=[item["data_samples"]] * 2), True)
    losses = model(**batch, mode="loss")
    assert set(losses) == {"loss_dice", "loss_ce"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    preds = model(batch["inputs"], [BaseDataElement(), BaseDataElement()], mode="predict")
    assert preds[0].pred_mask.shape == (8, 8, 8) and preds[0].pred_prob.shape == (1, 8, 8, 8)

    out = infer_nifti(model.model, [osp.join(str(tmp_path), "train", "images")], str(tmp_path / "out"),
                      size=(8, 8, 8), verbose=False)
    assert len(out) == 1 and osp.isfile(out[0]["overlay"])
    mask = nib.load(out[0]["mask"])
    assert mask.shape == (12, 10, 6) and np.allclose(mask.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(FileNotFoundError, match="nii"):
        infer_nifti(model.model, [str(tmp_path / "nope.png")], str(tmp_path / "out"))


def test_infer_tool_writes_nifti_mask_and_overlay(tmp_path):
    import subprocess
    import sys
    import nibabel as nib
    import numpy as np
    vol = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    src = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(src))
    import timm
    from safetensors.torch import save_file
    weights = tmp_path / "agunet_small.safetensors"
    save_file(timm.create_model("agunet_3d_small").state_dict(), str(weights))
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    subprocess.run([sys.executable, osp.join(repo, "tools", "infer.py"), str(weights), str(src),
                    "--model-name", "agunet_3d_small", "--out-dir", str(tmp_path / "out")],
                   check=True, capture_output=True, timeout=600)
    mask = nib.load(str(tmp_path / "out" / "case_mask.nii.gz"))
    assert mask.shape == vol.shape
    assert (tmp_path / "out" / "case_overlay.png").is_file()
