"""``import zoo.kernels`` loads the attention op only; ``import zoo`` still makes the families available
to timm, whatever the import order. Each case runs in a fresh interpreter."""
import json
import subprocess
import sys

import pytest

HEAVY = ("timm", "mmengine", "zoo.models", "zoo.layers", "zoo.engine")


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_import_loads_no_timm_mmengine_or_family():
    res = _run("import json, sys, torch\n"
               "import zoo.kernels\n"
               "q = torch.randn(1, 2, 16, 8)\n"
               "out = zoo.kernels.attention(q, q, q, zoo.kernels.window_2d(4, 4, block=2, halo=1))\n"
               f"print(json.dumps(dict(loaded=[m for m in {HEAVY!r} if m in sys.modules], shape=list(out.shape))))")
    assert res == dict(loaded=[], shape=[1, 2, 16, 8])


@pytest.mark.parametrize("imports", [
    "import zoo, timm",                                          # the README's order
    "from timm.models import create_model; import zoo, timm",    # timm first: registered on import zoo
    "import zoo.kernels, importlib.util; importlib.util.find_spec('timm'); import timm",  # op first, a probe
    "from zoo.models._builder import build_model; import zoo, timm",  # timm imported while zoo.models is half-done
])
def test_zoo_models_reach_timm_in_any_import_order(imports):
    res = _run(f"{imports}\n"
               "import json\n"
               "m = timm.create_model('biformer_tiny', num_classes=3)\n"
               "print(json.dumps(dict(cls=f'{type(m).__module__}.{type(m).__name__}',\n"
               "                      n=len(zoo.list_models()), fam=zoo.model_family('halonet_h0'))))")
    assert res["cls"] == "zoo.models.biformer.BiFormer"
    assert res["n"] > 10 and res["fam"] == "halonet"


def test_import_zoo_defers_timm_until_list_models():
    res = _run("import json, sys, zoo\n"
               f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
               "print(json.dumps(dict(loaded=loaded, models=zoo.list_models(family='biformer'),\n"
               "                      families=zoo.list_families())))")
    assert res["loaded"] == []
    assert "biformer_tiny" in res["models"]
    assert {"biformer", "halonet", "focus_detr"} <= set(res["families"])
