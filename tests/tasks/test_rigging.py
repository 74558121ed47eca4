"""Rigging task (Puppeteer skinning): the articulated-shapes dataset, the skinning model wrapper,
the skinning metric and the config."""
import os.path as osp

import numpy as np
import pytest
import timm
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_rigging_dataset_metric_and_config():
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate

    from zoo.tasks.rigging import ArticulatedShapesDataset, SkinningMetric, SkinningModel, skinning_scores

    ds = ArticulatedShapesDataset("val", num_samples=6, num_points=64, num_shape_points=16, max_joints=8)
    ds2 = ArticulatedShapesDataset("val", num_samples=6, num_points=64, num_shape_points=16, max_joints=8)
    a, b = ds[3], ds2[3]
    assert torch.equal(a["inputs"]["points"], b["inputs"]["points"]) and torch.equal(a["data_samples"].gt_skin,
                                                                                   b["data_samples"].gt_skin)
    for i in range(len(ds)):
        item = ds[i]
        gt, valid = item["data_samples"].gt_skin, item["inputs"]["valid"]
        torch.testing.assert_close(gt.sum(-1), torch.ones(64))
        assert (gt[:, ~valid] == 0).all()
        assert float(item["inputs"]["points"][:, :3].abs().max()) <= 0.45 + 1e-5
        torch.testing.assert_close(item["inputs"]["points"][:, 3:].norm(dim=-1), torch.ones(64))
    # the metric: a perfect prediction scores 1 / 1 / 0; upstream's thresholding known answer
    assert skinning_scores(gt[:, valid].numpy(), gt[:, valid].numpy()) == pytest.approx((1.0, 1.0, 0.0), abs=1e-6)
    p, r, l1 = skinning_scores(np.array([[0.6, 0.35, 0.05]]), np.array([[1.0, 0.0, 0.0]]), filter_thre=0.15)
    assert p == pytest.approx(0.5) and r == pytest.approx(1.0) and l1 == pytest.approx(2 * 0.35 / 0.95)
    model = SkinningModel("puppeteer_skin_small").eval()
    batch = pseudo_collate([ds[i] for i in range(3)])
    loss = model(**model.data_preprocessor(batch, True), mode="loss")["loss_skin"]
    assert torch.isfinite(loss) and loss > 0
    out = model(**model.data_preprocessor(batch), mode="predict")
    metric = SkinningMetric()
    metric.process(None, out)
    res = metric.compute_metrics(metric.results)
    assert 0 <= res["precision"] <= 1 and res["token_parents_ok"] == 1.0 and res["token_err"] <= 1 / 128 + 1e-6
    cfg = Config.fromfile(osp.join(ROOT, "configs/puppeteer/puppeteer_skin_small_shapes.py"))
    assert timm.create_model(cfg.model.model_name, **cfg.model.model_kwargs) is not None


# ------------------------------------------------------------------------------------------------
# timm generic calls, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------
