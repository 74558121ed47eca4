"""Part generation task (PartCrafter): the part-objects dataset, the rectified-flow model wrapper,
the matched part Chamfer metric and the configs."""
import pathlib

import pytest
import torch

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "partcrafter"


def test_task_dataset_loss_and_metric():
    from mmengine.dataset import pseudo_collate

    from zoo.tasks.part_generation import (PartChamferMetric, PartObjectsDataset, RectifiedFlowPartModel, chamfer,
                                             matched_part_chamfer)
    a = PartObjectsDataset("val", num_samples=4, points_per_part=16, num_cond=8)
    b = PartObjectsDataset("val", num_samples=4, points_per_part=16, num_cond=8)
    assert all(torch.equal(a[i]["inputs"]["parts"], b[i]["inputs"]["parts"]) for i in range(4))
    assert a[0]["inputs"]["context"].shape == (8, 27)
    gt = a[0]["data_samples"].gt_parts
    assert float(chamfer(gt[0], gt[0])) == 0.0
    n = gt.shape[0]
    assert matched_part_chamfer(gt.flip(0), gt) == 0.0  # order of parts does not matter
    if n > 1:
        assert matched_part_chamfer(gt, gt.roll(1, 0)) > 0
    model = RectifiedFlowPartModel(model_kwargs=dict(in_chans=3, context_dim=27), sample_steps=2)
    data = model.data_preprocessor(pseudo_collate([a[i] for i in range(4)]), True)
    loss = model(**data, mode="loss")["loss"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    preds = model(**data, mode="predict")
    metric = PartChamferMetric()
    metric.process(None, [dict(pred_parts=p.gt_parts, gt_parts=p.gt_parts) for p in preds])
    metric.process(None, [dict(pred_parts=p.pred_parts, gt_parts=p.gt_parts) for p in preds])
    res = metric.compute_metrics(metric.results)
    assert res["num_objects"] == 8 and 0 < res["part_cd"] and metric.results[0]["part"] == 0.0


@pytest.mark.parametrize("name", ["partcrafter_dit_tiny_parts", "partcrafter_dit_tiny_parts_global_only",
                                  "partcrafter_dit_tiny_parts_local_only"])
def test_configs_load_and_build(name):
    from mmengine.config import Config
    from zoo.registry import MODELS

    import zoo.engine  # noqa: F401
    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    model = MODELS.build(cfg.model)
    depth = cfg.model.model_kwargs.depth
    assert model.model.global_block_ids == tuple(cfg.model.model_kwargs.global_block_ids)
    assert len(model.model.blocks) == depth
