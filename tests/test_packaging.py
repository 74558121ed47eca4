"""The wheel: its contents (zoo.kernels, the configs, console scripts, licences), its core dependencies,
and the shipped configs found by name from an installed copy."""
import email
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("zoo-train", "zoo-test", "zoo-infer", "zoo-export", "zoo-convert")
# never pulled by `pip install attention-zoo` without extras
NOT_CORE = ("mmengine", "pycocotools", "scikit-learn", "scipy", "matplotlib", "opencv-python",
            "opencv-python-headless", "nibabel", "h5py", "scikit-image")


def test_editable_or_source_import_maps_kernels():
    import zoo.kernels
    assert Path(zoo.kernels.__file__).resolve().parent == REPO / "kernels"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a clean copy of the tree (a stale build/ folder cannot leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "work_dirs", ".pytest_cache", "data", "outputs"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((tmp / "dist").glob("attention_zoo-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel unpacked by pip into a bare target folder (no dependencies, no repo on the path)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def _run_installed(target, code, cwd):
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(cwd))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # every package and module of zoo/ and kernels/ (kernels/ as zoo.kernels), every config
    expected = {p.relative_to(REPO).as_posix() for p in REPO.glob("zoo/**/*.py") if "__pycache__" not in p.parts}
    expected |= {"zoo/kernels/" + p.relative_to(REPO / "kernels").as_posix()
                 for p in REPO.glob("kernels/**/*.py") if "__pycache__" not in p.parts}
    expected |= {"zoo/configs/" + p.relative_to(REPO / "configs").as_posix() for p in REPO.glob("configs/**/*.py")}
    assert "zoo/configs/_base_/default_runtime.py" in expected and "zoo/kernels/__init__.py" in expected
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)[:10]}"
    assert not any(n.startswith(("kernels/", "configs/", "tests/", "tools/")) for n in names)
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"{dist_info}/licenses/LICENSE", f"{dist_info}/licenses/THIRD_PARTY_NOTICES.md"} <= names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    for script in SCRIPTS:
        command = script.split("-")[1]
        assert re.search(rf"^{script} = zoo\.cli\._scripts:{command}$", entry_points, flags=re.M), script


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta.get_all("Classifier"))
    assert meta.get_all("Project-URL")
    core = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = [r for r in core if r.marker is None or "extra" not in str(r.marker)]
    assert sorted(canonicalize_name(r.name) for r in core) == sorted(
        ["torch", "torchvision", "timm", "triton", "numpy", "safetensors", "huggingface-hub", "tqdm"])
    extras = set(meta.get_all("Provides-Extra"))
    assert {"train", "detection", "medical", "bench", "all", "dev"} <= extras


def test_core_dependency_closure_has_no_extras(wheel):
    """Walk the core requirements through the installed distributions' own metadata (no index):
    the resolved set of a plain `pip install attention-zoo` on this platform."""
    env = default_environment()
    todo = [(Requirement(r), "") for r in _metadata(wheel).get_all("Requires-Dist")]
    seen, done = {}, set()
    while todo:  # (requirement, extra of the requiring distribution) pairs
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate(dict(env, extra=extra)):
            continue
        name = canonicalize_name(req.name)
        for wanted in ("", *req.extras):  # torch asks for cuda-toolkit[cublas,...]
            if (name, wanted) in done:
                continue
            done.add((name, wanted))
            dist = metadata.distribution(req.name)  # raises if a core dependency is not installed here
            seen[name] = dist.version
            todo.extend((Requirement(r), wanted) for r in (dist.requires or []))
    assert {"torch", "timm", "numpy"} <= set(seen)
    pulled = sorted(set(seen) & {canonicalize_name(n) for n in NOT_CORE})
    assert not pulled, f"the core install pulls {pulled}"


def test_installed_wheel_imports_from_its_own_folder(installed, tmp_path):
    out = _run_installed(installed, "import zoo.kernels, zoo, timm; print(zoo.kernels.__file__); "
                                    "print(zoo.__file__); print(len(zoo.list_models()))", tmp_path)
    kernels_file, zoo_file, n = out.splitlines()[-3:]
    assert kernels_file.startswith(str(installed)) and zoo_file.startswith(str(installed)) and int(n) > 10


def test_installed_configs_by_name(installed, tmp_path):
    code = ("import json, sys\n"
            "from mmengine.config import Config\n"
            "from zoo.cli._configs import config_names, config_root, resolve_config\n"
            "path = resolve_config('quickstart_digits')\n"
            "cfg = Config.fromfile(path)\n"  # relative _base_ files from the installed location
            "same = resolve_config('configs/biformer/biformer_tiny_digits.py')\n"
            "print(json.dumps(dict(root=str(config_root()), path=path, scope=cfg.default_scope,\n"
            "    model=cfg.model.type, epochs=cfg.train_cfg.max_epochs, n=len(config_names()), same=same)))\n")
    res = json.loads(_run_installed(installed, code, tmp_path).splitlines()[-1])
    assert res["root"] == str(installed / "zoo" / "configs")
    assert res["path"] == str(installed / "zoo" / "configs" / "quickstart_digits.py")
    assert res["same"] == str(installed / "zoo" / "configs" / "biformer" / "biformer_tiny_digits.py")
    assert (res["scope"], res["model"]) == ("zoo", "TimmClassifier") and res["epochs"] > 0
    shipped = [p for p in REPO.glob("configs/**/*.py")
               if not any(part.startswith("_") for part in p.relative_to(REPO / "configs").parts)]
    assert res["n"] == len(shipped)


def test_list_configs_from_the_installed_cli(installed, tmp_path):
    out = _run_installed(installed, "from zoo.cli.train import main; main(['--list-configs'])", tmp_path)
    lines = out.splitlines()
    assert lines[0].endswith(f"configs in {installed / 'zoo' / 'configs'}:")
    assert any(re.match(r"quickstart_digits\s+quickstart_digits\.py$", line) for line in lines)
    assert not any("_base_" in line or line.split()[0].startswith("_") for line in lines[1:])


def test_config_lookup_errors():
    from zoo.cli._configs import config_names, resolve_config

    assert Path(resolve_config("quickstart_digits")) == REPO / "configs" / "quickstart_digits.py"
    assert resolve_config(str(REPO / "configs" / "quickstart_digits.py")) == str(REPO / "configs" / "quickstart_digits.py")
    with pytest.raises(FileNotFoundError, match=r"quickstart_digit'.*did you mean quickstart_digits.*--list-configs"):
        resolve_config("quickstart_digit")
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config name"):
        resolve_config("_base_/default_runtime")  # building blocks are not names
    assert all(not name.startswith("_") for name in config_names())


def test_cli_rejects_unknown_config_name(capsys):
    from zoo.cli.test import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["no_such_config", "ckpt.pth"])
    assert exc.value.code == 2
    assert "config 'no_such_config' is neither a file nor a shipped config name" in capsys.readouterr().err


def test_console_script_exit_status(monkeypatch):
    """A command's result (metrics dict, written path) is success; an int is the status itself."""
    from zoo.cli import _scripts

    assert [_scripts.exit_status(r) for r in ({"accuracy/top1": 1.0}, "/out/model.safetensors", None, 0, 2)] == [
        0, 0, 0, 0, 2]
    monkeypatch.setattr(sys, "argv", ["zoo-convert", "no_such_model", "missing.pth", "out"])
    with pytest.raises(SystemExit) as exc:  # argparse/command errors still exit non-zero
        sys.exit(_scripts.convert())
    assert exc.value.code != 0
