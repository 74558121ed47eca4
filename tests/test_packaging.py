"""kernels/ is importable as zoo.kernels in both editable and wheel installs."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_editable_or_source_import_maps_kernels():
    import zoo.kernels
    assert Path(zoo.kernels.__file__).resolve().parent == REPO / "kernels"
    # zoo.kernels must stay free of mmengine (the GPU box has none)
    code = "import sys, zoo.kernels; print('mmengine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip().endswith("False")


def test_wheel_contains_and_imports_zoo_kernels(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "zoo/kernels/__init__.py" in names and not any(n.startswith("kernels/") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    code = "import zoo.kernels, zoo; print(zoo.kernels.__file__); print(len(zoo.list_models()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path), check=True)
    assert out.stdout.splitlines()[0].startswith(str(target))
