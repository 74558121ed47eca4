"""Fixtures for the engine tests; helpers live in _engine_helpers."""
import pytest

from _engine_helpers import run_tool, tiny_config


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One short training run (3 epochs x 4 iterations) shared by the train/resume/test/export tests."""
    root = tmp_path_factory.mktemp("digits_run")
    cfg = tiny_config(root / "tiny.py")
    work = root / "work"
    proc = run_tool("train.py", cfg, "--work-dir", work)
    return dict(cfg=cfg, work=work, root=root, log=proc.stdout + proc.stderr)
