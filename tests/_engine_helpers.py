"""Helpers for the engine tests: a tiny digits config (16 px, timm's 0.37M-param ``test_resnet``,
64 training images) and a subprocess runner for the tools. (Not named conftest: other test
folders have one, and ``from conftest import`` would be ambiguous.)"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
BASE = REPO / "configs" / "_base_"


def tiny_config(path: Path, extra: str = "", max_epochs: int = 3, model: str = "test_resnet") -> Path:
    path.write_text(f"""
_base_ = [{str(BASE / 'datasets/digits.py')!r}, {str(BASE / 'schedules/digits.py')!r},
          {str(BASE / 'default_runtime.py')!r}]
model = dict(type='TimmClassifier', model_name={model!r}, num_classes=10)
train_dataloader = dict(batch_size=16, dataset=dict(img_size=16, max_samples=64, augment=True))
val_dataloader = dict(batch_size=120, dataset=dict(img_size=16))
test_dataloader = dict(batch_size=120, dataset=dict(img_size=16))
train_cfg = dict(max_epochs={max_epochs})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(max_keep_ckpts=-1))
log_processor = dict(window_size=1)
{extra}
""")
    return path


def run_tool(tool: str, *args, timeout: int = 300, check: bool = True, env_extra=None, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(env_extra or {})
    cmd = [sys.executable, str(TOOLS / tool), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
