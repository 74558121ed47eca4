"""Zoo names are unique against timm's registry and answer through zoo.list_models/model_family."""
import json
import subprocess
import sys

import pytest
import timm

import zoo


def test_no_timm_name_overwritten():
    # a fresh interpreter: record timm's registry, then import zoo and compare
    code = (
        "import json, warnings, timm\n"
        "from timm.models._registry import _model_entrypoints, _model_to_module\n"
        "before = {n: (f.__module__, _model_to_module[n]) for n, f in _model_entrypoints.items()}\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import zoo\n"
        "after = {n: (_model_entrypoints[n].__module__, _model_to_module[n]) for n in before}\n"
        "print(json.dumps(dict(changed=[n for n in before if before[n] != after[n]],\n"
        "    overwrite_warnings=[str(x.message) for x in w if 'Overwriting' in str(x.message)],\n"
        "    zoo=zoo.list_models())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["changed"] == [] and res["overwrite_warnings"] == []
    timm_modules = set(timm.list_modules()) - set(zoo.list_families())
    assert not set(zoo.list_families()) & timm_modules


def test_family_modules_are_not_timm_module_names():
    from timm.models._registry import _module_to_models
    for family in zoo.list_families():
        foreign = [n for n in _module_to_models.get(family, ()) if not timm.models.model_entrypoint(n).__module__.startswith("zoo.")]
        assert not foreign, f"zoo module {family} shares timm's basename with {foreign[:3]}"


def test_list_models_and_family():
    names = zoo.list_models()
    assert len(names) == len(set(names))
    for name in names:
        fam = zoo.model_family(name)
        assert fam in zoo.list_families()
        assert name in zoo.list_models(family=fam)
        assert timm.is_model(name)
        assert timm.models.model_entrypoint(name).__name__ != fam  # entry point never named like its module
    for name in zoo.list_models(pretrained=True):
        assert "." in name and zoo.model_family(name) == zoo.model_family(name.split(".")[0])
    assert set(zoo.list_models(pretrained=True)) <= set(timm.list_models(pretrained=True))


def test_list_models_errors():
    with pytest.raises(ValueError, match="unknown family"):
        zoo.list_models(family="no_such_family")
    with pytest.raises(ValueError, match="not a zoo model"):
        zoo.model_family("resnet50")
