"""Every official checkpoint layout a family claims to load maps strictly onto the zoo model.

Each ``tests/fixtures/official_keys/<model>[__<layout>].json`` holds the key names and shapes (no
weights) of a state dict written by the upstream code named in its ``source`` field:
``{"source": "<repo>@<commit>:<file>", "keys": {key: shape}}`` plus optional ``model_kwargs``.
The test builds ``<model>`` on the meta device, makes tensors of those shapes, runs the family's
``checkpoint_filter_fn`` and loads the result with ``strict=True``: a renamed, missing or
reshaped parameter anywhere fails here.
"""
import importlib
import json
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the models)

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "official_keys").glob("*.json"))


def _model_name(path: Path) -> str:
    return path.stem.split("__")[0]


def test_fixtures_exist_and_are_well_formed():
    assert FIXTURES, "no official key-layout fixtures"
    for path in FIXTURES:
        data = json.loads(path.read_text())
        assert set(data) <= {"source", "keys", "model_kwargs"}, path.name
        assert "@" in data["source"] and ":" in data["source"], f"{path.name}: source must be <repo>@<commit>:<file>"
        assert data["keys"] and all(isinstance(s, list) for s in data["keys"].values()), path.name
        assert timm.is_model(_model_name(path)), f"{path.name}: no zoo model {_model_name(path)!r}"


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_official_layout_loads_strictly(path):
    data = json.loads(path.read_text())
    name = _model_name(path)
    module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
    with torch.device("meta"):
        model = timm.create_model(name, **data.get("model_kwargs", {}))
        state_dict = {k: torch.empty(shape) for k, shape in data["keys"].items()}
    mapped = module.checkpoint_filter_fn(state_dict, model)
    result = model.load_state_dict(mapped, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
