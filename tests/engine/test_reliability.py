"""Reliability of training runs: crash-safe checkpoints, the work-dir lock, strict weight loading,
resume edge cases, named splits, and config typos caught before anything runs."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoo.engine  # noqa: F401
from _engine_helpers import REPO, TOOLS, run_tool, tiny_config
from zoo.engine.checkpoint import TEMP_MARK, WorkDirBusyError, WorkDirLock, find_resumable_checkpoint
from zoo.engine.compat import load_checkpoint_file

HERE = Path(__file__).resolve().parent
BEST = "best_accuracy_top1_epoch_{}.pth"


def _crash_config(root: Path, name: str, crash=None) -> Path:
    """The tiny digits run keeping one epoch checkpoint and a best one. Its val top-1 falls from
    epoch to epoch, so with rule='less' every epoch is a new best and replaces the previous one."""
    hooks = ""
    if crash:
        point, target, occurrence = crash
        hooks = f"custom_hooks = [dict(type='CrashAtHook', point={point!r}, name={target!r}, occurrence={occurrence})]"
    return tiny_config(root / f"{name}.py", extra=f"""
custom_imports = dict(imports=['zoo.engine', '_crash_hook'], allow_failed_imports=False)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(max_keep_ckpts=1, rule='less'))
{hooks}
""")


def _train(cfg: Path, work: Path, *extra, check=False):
    return run_tool("train.py", cfg, "--work-dir", work, *extra, check=check,
                    env_extra=dict(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])))


def _files(work: Path):
    return sorted(p.name for p in work.iterdir() if p.is_file())


def _last_checkpoint(work: Path) -> str:
    return Path((work / "last_checkpoint").read_text().strip()).name


# each chain: SIGKILL at the given points of successive runs, each resumed with --resume; the
# check after each crash proves the process died at that exact moment
CHAINS = {
    "epoch-best-removals": [
        (("rename", "epoch_2.pth", 1),  # epoch 2's checkpoint complete in its temp file, not renamed
         lambda w, f: "epoch_2.pth" not in f and any(n.startswith(".epoch_2.pth" + TEMP_MARK) for n in os.listdir(w))
         and _last_checkpoint(w) == "epoch_1.pth"),
        (("rename", BEST.format(2), 1),  # new best written to its temp file; previous best still there
         lambda w, f: BEST.format(1) in f and BEST.format(2) not in f and "epoch_2.pth" in f),
        (("remove", BEST.format(1), 1),  # new best saved, previous best about to be removed
         lambda w, f: BEST.format(1) in f and BEST.format(2) in f),
        (("remove", "epoch_2.pth", 1),  # max_keep_ckpts=1: epoch 3 saved, epoch 2 about to be removed
         lambda w, f: {"epoch_2.pth", "epoch_3.pth"} <= set(f) and _last_checkpoint(w) == "epoch_3.pth"),
    ],
    "last_checkpoint-resave": [
        (("rename", "last_checkpoint", 3),  # epoch_2.pth complete, last_checkpoint still names epoch 1
         lambda w, f: "epoch_2.pth" in f and _last_checkpoint(w) == "epoch_1.pth"),
        (("rename", "epoch_3.pth", 2),  # the re-save of epoch 3 after its new best
         lambda w, f: BEST.format(3) in f and any(n.startswith(".epoch_3.pth" + TEMP_MARK) for n in os.listdir(w))),
    ],
}


def _run_chain(root: Path, steps) -> Path:
    """Crash at each point in turn (each run after the first with --resume), then finish with --resume."""
    root.mkdir()
    work = root / "work"
    for i, (crash, state_ok) in enumerate(steps):
        proc = _train(_crash_config(root, f"crash{i}", crash), work, *(["--resume"] if i else []))
        assert proc.returncode == -9, (crash, proc.returncode, proc.stderr[-3000:])
        assert state_ok(work, _files(work)), (crash, os.listdir(work))
        if i:  # the killed run's lock file was left behind: taken over with a warning
            assert "took over the lock" in proc.stderr and "no longer running" in proc.stderr
    _train(_crash_config(root, "final"), work, "--resume", check=True)
    return work


def test_sigkill_during_each_save_then_resume_matches_uninterrupted(trained, tmp_path):
    """Real training processes SIGKILLed at six points of the checkpoint writes (two chains, run
    side by side); after --resume each run ends with the uninterrupted run's weights, the same
    best checkpoint, and no temporary, empty or superseded file."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(CHAINS)) as pool:
        futures = {name: pool.submit(_run_chain, tmp_path / name, steps) for name, steps in CHAINS.items()}
        works = {name: f.result() for name, f in futures.items()}
    straight = load_checkpoint_file(str(trained["work"] / "epoch_3.pth"))
    for name, work in works.items():
        names = os.listdir(work)
        assert not [n for n in names if TEMP_MARK in n or n == WorkDirLock.NAME], (name, names)
        assert not [n for n in names if (work / n).is_file() and (work / n).stat().st_size == 0], (name, names)
        assert sorted(n for n in names if n.endswith(".pth")) == [BEST.format(3), "epoch_3.pth"], (name, names)
        assert _last_checkpoint(work) == "epoch_3.pth"
        final = load_checkpoint_file(str(work / "epoch_3.pth"))
        assert final["meta"]["iter"] == straight["meta"]["iter"] == 12
        for k, v in straight["state_dict"].items():
            torch.testing.assert_close(final["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        best = load_checkpoint_file(str(work / BEST.format(3)))
        for k, v in final["state_dict"].items():
            torch.testing.assert_close(best["state_dict"][k], v, rtol=0, atol=0, msg=f"{name}: {k}")


def test_resume_reproduces_losses_with_augmentation(trained, tmp_path):
    """The tiny run augments with numpy's RNG: resuming from epoch 1 must log the same losses for
    epochs 2-3 as the uninterrupted run (RNG states and data order restored)."""
    work = tmp_path / "resumed"
    proc = run_tool("train.py", trained["cfg"], "--work-dir", work, "--resume", trained["work"] / "epoch_1.pth")

    def losses(log):
        return {(int(e), int(i)): float(l) for e, i, l in
                re.findall(r"Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/\d+\].*?\sloss: ([0-9.]+)", log)}
    straight, resumed = losses(trained["log"]), losses(proc.stdout + proc.stderr)
    assert sorted(resumed) == [(e, i) for e in (2, 3) for i in range(1, 5)]
    for key, value in resumed.items():
        assert value == pytest.approx(straight[key], abs=1e-4), (key, value, straight[key])


def test_second_training_on_held_work_dir_is_refused(tmp_path):
    work = tmp_path / "work"
    release = tmp_path / "go"
    cfg = tiny_config(tmp_path / "hold.py", max_epochs=1, extra=f"""
custom_imports = dict(imports=['zoo.engine', '_crash_hook'], allow_failed_imports=False)
custom_hooks = [dict(type='WaitForFileHook', path={str(release)!r})]
""")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    first = subprocess.Popen([sys.executable, str(TOOLS / "train.py"), str(cfg), "--work-dir", str(work)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not Path(str(release) + ".waiting").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != ".lock"}
        second = _train(cfg, work)
        assert second.returncode != 0
        assert f"pid {first.pid} on host" in second.stderr and "is in use by" in second.stderr, second.stderr[-2000:]
        assert "train.py" in second.stderr  # the holder's command
        after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # the refused run wrote nothing, not even a log folder
    finally:
        release.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert (work / "epoch_1.pth").is_file() and not (work / WorkDirLock.NAME).exists()


# -- work-dir lock (in-process) ------------------------------------------------------------------
def test_work_dir_lock_names_holder_and_takes_over_stale(tmp_path):
    held = WorkDirLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(WorkDirBusyError, match=rf"in use by pid {os.getpid()} on host .* since .*UTC"):
            WorkDirLock(str(tmp_path)).acquire()
    finally:
        held.release()
    assert not (tmp_path / ".lock").exists()
    # a lock file whose process died (no flock held any more)
    (tmp_path / ".lock").write_text('{"pid": 999999, "host": "h", "started": "then", "command": "train.py x"}')
    lock = WorkDirLock(str(tmp_path)).acquire()
    assert lock.stale_holder["pid"] == 999999
    lock.release()


def test_atomic_write_and_stale_temp_cleanup(tmp_path):
    from zoo.engine.checkpoint import atomic_write_text, remove_stale_temps
    target = tmp_path / "last_checkpoint"
    atomic_write_text(str(target), "a")
    atomic_write_text(str(target), "b")
    assert target.read_text() == "b" and os.listdir(tmp_path) == ["last_checkpoint"]
    dead, live = tmp_path / f".epoch_1.pth{TEMP_MARK}999999", tmp_path / f".epoch_2.pth{TEMP_MARK}1"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")  # pid 1 is running: its write may be in progress
    assert remove_stale_temps(str(tmp_path)) == [str(dead)]
    assert live.exists() and not dead.exists()


# -- resume edge cases ---------------------------------------------------------------------------
def test_find_resumable_checkpoint(tmp_path, trained):
    assert find_resumable_checkpoint(str(tmp_path)) is None  # nothing there: a fresh start
    good = (trained["work"] / "epoch_1.pth").read_bytes()
    (tmp_path / "epoch_1.pth").write_bytes(good)
    (tmp_path / "epoch_2.pth").write_bytes(good[: len(good) // 2])  # truncated by a crash
    (tmp_path / "epoch_3.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_3.pth"))
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / "epoch_1.pth")
    (tmp_path / "epoch_1.pth").unlink()
    with pytest.raises(RuntimeError, match=r"no complete checkpoint.*epoch_3\.pth.*epoch_2\.pth"):
        find_resumable_checkpoint(str(tmp_path))


def test_resume_edge_cases_fail_before_training(trained, tmp_path, capsys):
    from zoo.cli import train

    plain = tmp_path / "plain.pth"
    torch.save(load_checkpoint_file(str(trained["work"] / "epoch_1.pth"))["state_dict"], plain)
    with pytest.raises(ValueError, match=r"cannot resume from .*plain\.pth.*plain state dict.*--load-from"):
        train.build_cfg(train.parse_args([str(trained["cfg"]), "--work-dir", str(tmp_path / "w"), "--resume", str(plain)]))
    # --resume with an empty work dir: a fresh start, said so
    args = train.parse_args([str(trained["cfg"]), "--work-dir", str(tmp_path / "empty"), "--resume"])
    cfg = train.build_cfg(args)
    train.settle_resume(cfg)
    assert cfg.resume is False and "no checkpoint in" in capsys.readouterr().err
    # --resume over unreadable checkpoints: refused (a fresh start would overwrite them)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "epoch_3.pth").write_bytes(b"")
    cfg = train.build_cfg(train.parse_args([str(trained["cfg"]), "--work-dir", str(broken), "--resume"]))
    with pytest.raises(RuntimeError, match="no complete checkpoint"):
        train.settle_resume(cfg)
    with pytest.raises(ValueError, match="--partial-load applies to --load-from"):
        train.build_cfg(train.parse_args([str(trained["cfg"]), "--partial-load"]))


@pytest.mark.parametrize("content", ["truncated", "empty", "random", "text"])
def test_unreadable_weights_name_the_file(trained, tmp_path, content):
    from zoo.cli import train

    good = (trained["work"] / "epoch_1.pth").read_bytes()
    data = dict(truncated=good[:20000], empty=b"", random=os.urandom(4096),
                text=b"model weights are in the other folder\n")[content]
    path = tmp_path / f"{content}.pth"
    path.write_bytes(data)
    for flag in ("--load-from", "--resume"):
        with pytest.raises(RuntimeError, match=rf"cannot read checkpoint '{re.escape(str(path))}'"):
            train.build_cfg(train.parse_args([str(trained["cfg"]), "--work-dir", str(tmp_path / "w"), flag, str(path)]))


# -- weights that do not fit ---------------------------------------------------------------------
def _foreign_checkpoint(tmp_path, num_classes=10, model="test_vit"):
    from zoo.engine import TimmClassifier
    kw = dict(model_kwargs=dict(img_size=16, patch_size=8)) if model == "test_vit" else {}
    m = TimmClassifier(model, num_classes=num_classes, **kw)
    path = tmp_path / f"{model}_{num_classes}.pth"
    torch.save(dict(meta=dict(epoch=1, iter=4), state_dict=m.state_dict()), path)
    return path, m.state_dict()


def test_check_weights_fit_lists_mismatches_and_partial_loads():
    from zoo.engine import TimmClassifier
    from zoo.engine.hooks import check_weights_fit

    model = TimmClassifier("test_resnet", num_classes=10).state_dict()
    five = TimmClassifier("test_resnet", num_classes=5).state_dict()
    vit = TimmClassifier("test_vit", num_classes=10, model_kwargs=dict(img_size=16, patch_size=8)).state_dict()
    assert check_weights_fit(model, dict(model), "x")["loaded"] == len(model)
    with pytest.raises(RuntimeError, match=r"weights in ckpt\.pth do not fit.*missing in the checkpoint: .*"
                                           r"not in the model: .*--partial-load"):
        check_weights_fit(model, dict(vit), "ckpt.pth")
    with pytest.raises(RuntimeError, match=r"shape mismatch: model\.fc\.bias \(5,\) vs model \(10,\), model\.fc\.weight \(5, 96\) vs model \(10, 96\)"):
        check_weights_fit(model, dict(five), "ckpt.pth")
    with pytest.raises(RuntimeError, match="no tensor of ckpt.pth fits"):  # a partial load must load something
        check_weights_fit(model, dict(vit), "ckpt.pth", partial=True)
    with pytest.raises(RuntimeError, match="outside the allowed patterns"):
        check_weights_fit(model, dict(five), "ckpt.pth", partial=["model.conv1.*"])
    loaded = dict(five)
    report = check_weights_fit(model, loaded, "ckpt.pth", partial=["model.fc.*"])
    assert report["shape_mismatch"] == ["model.fc.bias", "model.fc.weight"]
    assert "model.fc.weight" not in loaded and report["loaded"] == len(model) - 2
    # a bare timm state dict gets a hint
    bare = {k[len("model."):]: v for k, v in model.items() if k.startswith("model.")}
    with pytest.raises(RuntimeError, match="bare timm state dict"):
        check_weights_fit(model, bare, "timm.pth")


def test_test_tool_refuses_weights_of_another_model(trained, tmp_path):
    from zoo.cli import test as test_tool
    path, _ = _foreign_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match=r"test_vit_10\.pth.* do not fit the model: missing in the checkpoint"):
        test_tool.main([str(trained["cfg"]), str(path), "--work-dir", str(tmp_path / "w")])
    assert not (tmp_path / "w" / "metrics.json").exists()


def test_load_from_must_fit_unless_partial(trained, tmp_path):
    from mmengine.runner import Runner

    from zoo.cli import train
    foreign, _ = _foreign_checkpoint(tmp_path)
    cfg = train.build_cfg(train.parse_args([str(trained["cfg"]), "--work-dir", str(tmp_path / "a"),
                                            "--load-from", str(foreign)]))
    runner = Runner.from_cfg(cfg)
    with pytest.raises(RuntimeError, match="do not fit the model"):
        runner.load_or_resume()
    # a head swap: a 5-class checkpoint of the same architecture, fine-tuned with 10 classes
    five, five_sd = _foreign_checkpoint(tmp_path, num_classes=5, model="test_resnet")
    cfg = train.build_cfg(train.parse_args([str(trained["cfg"]), "--work-dir", str(tmp_path / "b"),
                                            "--load-from", str(five), "--partial-load", "model.fc.*"]))
    # its own experiment name: two Runners built in the same second would share one logger (and log file)
    cfg.experiment_name = "partial_load_b"
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    sd = runner.model.state_dict()
    assert torch.equal(sd["model.conv1.0.weight"], five_sd["model.conv1.0.weight"])
    assert sd["model.fc.weight"].shape == (10, 96)
    log = (Path(runner.log_dir) / f"{runner.timestamp}.log").read_text()
    assert "partial load from" in log and "model.fc.weight" in log


# -- splits and config typos ---------------------------------------------------------------------
def test_missing_split_is_an_error_naming_the_folders(tmp_path):
    from PIL import Image

    from zoo.engine import ImageFolderDataset
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "0.png")
    (tmp_path / "test").mkdir()
    assert len(ImageFolderDataset(str(tmp_path), "train", img_size=8)) == 2
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found.*Folders in .*\['test', 'train'\]"):
        ImageFolderDataset(str(tmp_path), "val", img_size=8)


@pytest.mark.parametrize("extra,message", [
    ("train_cfg = dict(max_epoch=3)", r"train_cfg\.max_epoch is not an argument of EpochBasedTrainLoop; did you mean 'max_epochs'"),
    ("train_dataloader = dict(dataset=dict(img_sise=16))", r"train_dataloader\.dataset\.img_sise is not an argument of DigitsDataset; did you mean 'img_size'"),
    ("optim_wrapper = dict(optimizer=dict(lr='1e-3'))", r"optim_wrapper\.optimizer\.lr='1e-3' is a string, but AdamW expects a number"),
    ("default_hooks = dict(checkpoint=dict(intervl=1))", r"default_hooks\.checkpoint\.intervl is not an argument of .*CheckpointHook; did you mean 'interval'"),
    ("train_cfg = dict(max_epochs='3')", r"train_cfg\.max_epochs='3' is a string, but EpochBasedTrainLoop expects a number"),
    ("train_dataloader = dict(batch_sise=4)", r"train_dataloader\.batch_sise is not an argument of DataLoader; did you mean 'batch_size'"),
])
def test_nested_config_typos_fail_before_the_runner(tmp_path, extra, message):
    from zoo.engine.config_check import load_config
    cfg = tiny_config(tmp_path / "typo.py", extra=extra)
    with pytest.raises(ValueError, match=message):
        load_config(str(cfg))


def test_show_predictions_hook_draws_boxes_in_input_pixels(tmp_path):
    """tools/test.py --show-dir: detection boxes (file pixels) are drawn scaled to the network
    input, boxes under the score threshold are not, and samples without boxes are skipped."""
    from types import SimpleNamespace

    import numpy as np
    from mmengine.structures import BaseDataElement, InstanceData
    from PIL import Image

    from zoo.engine.hooks import ShowPredictionsHook
    hook = ShowPredictionsHook(str(tmp_path / "show"), score_thr=0.5)
    sample = BaseDataElement(metainfo=dict(img_id=7, scale_factor=(2.0, 2.0)))
    sample.pred_instances = InstanceData(bboxes=torch.tensor([[5.0, 5.0, 10.0, 10.0], [15.0, 2.0, 18.0, 6.0]]),
                                         scores=torch.tensor([0.9, 0.2]), labels=torch.tensor([1, 0]))
    plain = BaseDataElement(metainfo=dict(img_id=8))  # a classification-like sample: nothing to draw
    runner = SimpleNamespace(test_dataloader=SimpleNamespace(dataset=SimpleNamespace(metainfo=dict(classes=("a", "b")))))
    batch = dict(inputs=torch.zeros(2, 3, 40, 40, dtype=torch.uint8))
    hook.after_test_iter(runner, 0, batch, [sample, plain])
    assert hook.written == 1 and sorted(os.listdir(tmp_path / "show")) == ["7.png"]
    img = np.asarray(Image.open(tmp_path / "show" / "7.png"))
    assert img.shape == (40, 40, 3)
    red = (img[..., 0] > 200) & (img[..., 1] < 50)
    assert red[10, 10:21].all() and red[10:21, 10].all()  # the 0.9 box at 2x scale: (10, 10)-(20, 20)
    assert not red[4:12, 30:36].any()  # the 0.2 box (30, 4)-(36, 12) is below the threshold
    with pytest.raises(ValueError, match="score_thr"):
        ShowPredictionsHook(str(tmp_path), score_thr=2)


def test_shipped_configs_pass_the_argument_checks():
    """The argument checks know every shipped config's arguments (no false alarm)."""
    from zoo.engine.config_check import load_config
    configs = [p for p in sorted((REPO / "configs").rglob("*.py")) if not any(part.startswith("_") for part in
                                                                               p.relative_to(REPO / "configs").parts)]
    assert len(configs) > 20
    for path in configs:
        load_config(str(path))


def test_test_tool_show_dir_draws_detections(tmp_path, capsys):
    """tools/test.py --show-dir on the tiny detector: one PNG per test image, at the network's
    input size, with boxes drawn (score threshold 0 draws every query's box)."""
    import numpy as np
    from mmengine.config import Config
    from PIL import Image

    from zoo.cli import test as tool
    from zoo.registry import MODELS
    cfg_path = REPO / "configs" / "focus_detr" / "focus_detr_tiny_digits.py"
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(cfg_path)).model)
    ckpt = tmp_path / "tiny.pth"
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    root = tmp_path / "digits"
    tool.main([str(cfg_path), str(ckpt), "--work-dir", str(tmp_path / "w"), "--show-dir", str(tmp_path / "show"),
               "--show-score-thr", "0", "--cfg-options", f"test_dataloader.dataset.data_root={root}",
               "test_dataloader.dataset.num_train=4", "test_dataloader.dataset.num_val=3",
               f"val_dataloader.dataset.data_root={root}"])
    shown = sorted((tmp_path / "show").glob("*.png"))
    assert len(shown) == 3 and "3 image(s) with predictions drawn" in capsys.readouterr().out
    img = np.asarray(Image.open(shown[0]))
    assert img.ndim == 3 and ((img[..., 0] > 200) & (img[..., 1] < 50)).sum() > 50  # red box outlines


def test_zoo_scope_checkpoint_hook_is_the_atomic_one():
    from mmengine.registry import HOOKS, DefaultScope

    from zoo.engine.hooks import AtomicCheckpointHook
    with DefaultScope.overwrite_default_scope("zoo"):
        assert type(HOOKS.build(dict(type="CheckpointHook", interval=1))) is AtomicCheckpointHook
    with DefaultScope.overwrite_default_scope("mmengine"):  # the root's stays mmengine's own
        assert type(HOOKS.build(dict(type="CheckpointHook", interval=1))) is not AtomicCheckpointHook
