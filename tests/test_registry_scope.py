"""The zoo's mmengine components live in the 'zoo' scope and do not collide with another codebase's
components of the same names in mmengine's root registries (mmpretrain registers ``TimmClassifier``,
``ClsDataPreprocessor`` and ``Accuracy`` there under its own scope)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the stand-ins stay out of this process's root registries.
_COLLISION = textwrap.dedent("""
    import json, sys
    import torch
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseDataPreprocessor, BaseModel
    from mmengine.registry import DefaultScope, METRICS, MODELS

    # Another codebase's components, under the zoo's class names, in mmengine's ROOT registries.
    @MODELS.register_module(name="TimmClassifier")
    class StandInClassifier(BaseModel):
        def __init__(self, backbone, neck=None, head=None, data_preprocessor=None):
            super().__init__()
            self.backbone = backbone

        def forward(self, inputs, data_samples=None, mode="tensor"):
            return inputs

    @MODELS.register_module(name="ClsDataPreprocessor")
    class StandInPreprocessor(BaseDataPreprocessor):
        def __init__(self, num_classes, to_rgb=False):
            super().__init__()

    @METRICS.register_module(name="Accuracy")
    class StandInAccuracy(BaseMetric):
        def __init__(self, topk_list):
            super().__init__()

        def process(self, data_batch, data_samples):
            pass

        def compute_metrics(self, results):
            return {}

    from mmengine.runner import Runner
    from zoo.cli._configs import resolve_config
    from zoo.engine.config_check import load_config

    work_dir = sys.argv[1]
    cfg = load_config(resolve_config("quickstart_digits"), work_dir=work_dir)
    runner = Runner.from_cfg(cfg)       # builds the model exactly as zoo-train does
    model = runner.model
    evaluator = runner.build_evaluator(cfg.val_evaluator)
    out = dict(
        scope=cfg.default_scope,
        model=f"{type(model).__module__}.{type(model).__name__}",
        preprocessor=f"{type(model.data_preprocessor).__module__}.{type(model.data_preprocessor).__name__}",
        metric=[f"{type(m).__module__}.{type(m).__name__}" for m in evaluator.metrics],
    )
    # the same names built from the root scope give the other codebase's classes
    with DefaultScope.overwrite_default_scope("mmengine"):
        out["root_model"] = type(MODELS.build(dict(type="TimmClassifier", backbone=dict()))).__name__
        out["root_preprocessor"] = type(MODELS.build(dict(type="ClsDataPreprocessor", num_classes=3))).__name__
        out["root_metric"] = type(METRICS.build(dict(type="Accuracy", topk_list=[1]))).__name__
    print(json.dumps(out))
""")


def test_zoo_config_builds_zoo_classes_next_to_root_stand_ins(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _COLLISION, str(tmp_path / "work")], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["scope"] == "zoo"
    assert res["model"] == "zoo.engine.model.TimmClassifier"
    assert res["preprocessor"] == "zoo.engine.model.ClsDataPreprocessor"
    assert res["metric"] == ["zoo.engine.metrics.Accuracy"]
    assert (res["root_model"], res["root_preprocessor"], res["root_metric"]) == (
        "StandInClassifier", "StandInPreprocessor", "StandInAccuracy")


def test_zoo_registries_are_children_of_the_root():
    import mmengine.registry as root

    from zoo import registry

    for name in ("MODELS", "DATASETS", "METRICS", "DATA_SAMPLERS", "MODEL_WRAPPERS", "HOOKS"):
        child = getattr(registry, name)
        assert child.scope == "zoo" and child.parent is getattr(root, name), name
    import zoo.engine  # noqa: F401  (registers the zoo's components)
    assert registry.MODELS.get("TimmClassifier").__module__ == "zoo.engine.model"
    # nothing of the zoo's is registered in the root under the names other codebases use
    for reg, name in ((root.MODELS, "TimmClassifier"), (root.MODELS, "ClsDataPreprocessor"),
                      (root.METRICS, "Accuracy")):
        assert name not in reg.module_dict, f"{name} is in mmengine's root {reg.name} registry"
