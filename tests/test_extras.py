"""A missing optional dependency fails with the pip extra that brings it."""
import subprocess
import sys

import pytest

from zoo._extras import EXTRAS, requires_extra


def _hidden(modules, code):
    """Run ``code`` in a fresh interpreter in which ``modules`` cannot be imported."""
    block = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, cwd="/", timeout=600)


def test_requires_extra_names_the_extra():
    sys.modules.setdefault("zoo_test_absent_pkg", None)
    EXTRAS["bench"]["zoo_test_absent_pkg"] = "zoo-test-absent-pkg"
    try:
        with pytest.raises(ImportError, match=r"zoo-test-absent-pkg.*pip install 'attention-zoo\[bench\]'"):
            with requires_extra("bench", "plotting"):
                import zoo_test_absent_pkg  # noqa: F401
    finally:
        del EXTRAS["bench"]["zoo_test_absent_pkg"]
        sys.modules.pop("zoo_test_absent_pkg", None)


def test_requires_extra_passes_other_errors_through():
    with pytest.raises(ModuleNotFoundError):  # not a package of the extra: unchanged
        with requires_extra("bench"):
            import zoo_test_not_an_extra_pkg  # noqa: F401
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        with requires_extra("gpu"):
            pass


def test_engine_without_mmengine_names_train_extra():
    proc = _hidden(["mmengine"], "import zoo.engine")
    assert proc.returncode != 0
    assert "pip install 'attention-zoo[train]'" in proc.stderr.strip().splitlines()[-1]


def test_cli_without_mmengine_names_train_extra():
    proc = _hidden(["mmengine"], "from zoo.cli.train import main; main(['quickstart_digits'])")
    assert "pip install 'attention-zoo[train]'" in proc.stderr.strip().splitlines()[-1]


def test_coco_without_pycocotools_names_detection_extra(tmp_path):
    proc = _hidden(["pycocotools"], f"from zoo.tasks.detection import CocoDetection; CocoDetection({str(tmp_path)!r})")
    assert "pip install 'attention-zoo[detection]'" in proc.stderr.strip().splitlines()[-1]


def test_core_model_use_needs_no_extra():
    hidden = ["mmengine", "pycocotools", "sklearn", "scipy", "matplotlib", "nibabel", "h5py", "cv2"]
    proc = _hidden(hidden, "import torch, timm, zoo\n"
                           "for name in ('biformer_tiny', 'halonet_h0', 'ffnet_1'):\n"
                           "    m = timm.create_model(name, num_classes=4).eval()\n"
                           "    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 4), name\n"
                           "print('ok')")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
