"""CPU DDP through torchrun: 2 gloo processes train a few iterations with tools/train.py and must
end with identical weights (mmengine 0.10.7 alone fails here: cuda.set_device / device_ids)."""
import socket
import subprocess
import sys

import torch

from _engine_helpers import REPO, TOOLS, tiny_config
from zoo.engine.compat import load_checkpoint_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    dump = tmp_path / "ranks"
    extra = (f"custom_imports = dict(imports=['zoo.engine', '_ddp_dump'], allow_failed_imports=False)\n"
             f"custom_hooks = [dict(type='DumpRankWeightsHook', out_dir={str(dump)!r})]\n"
             # (re-assigning in the same file replaces the earlier dict, so restate it whole)
             "train_dataloader = dict(batch_size=16, dataset=dict(img_size=16, max_samples=48, augment=False))\n"
             "val_dataloader = dict(batch_size=30, dataset=dict(img_size=16, max_samples=60))\n")
    cfg = tiny_config(tmp_path / "ddp.py", extra=extra, max_epochs=2)
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO / "tests" / "engine") + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(TOOLS / "train.py"), str(cfg), "--launcher", "pytorch",
           "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # 48 images, batch 16 per rank, 2 ranks -> 2 iterations per epoch (DistributedSampler)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["iter"] == r1["iter"] == 4
    # parameters by DDP's gradient all-reduce; BatchNorm statistics by the SyncBuffersHook
    # that tools/train.py adds in distributed runs
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k
    # rank 0's checkpoint after epoch 1 differs from the final weights: training did happen
    start = load_checkpoint_file(str(tmp_path / "work" / "epoch_1.pth"))["state_dict"]
    assert any(not torch.equal(start[k], v) for k, v in r0["state_dict"].items() if v.is_floating_point())
    assert "accuracy/top1" in proc.stdout + proc.stderr
