"""Training runs a user can trust: no hang with loader workers, divergence stops with one clear error and
finite checkpoints, checkpoint writes that fail cleanly, run folders that never overwrite a user's file,
resume overrides applied or refused (never silently ignored)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from dfineseg import api, cli
from dfineseg.config import build_config
from dfineseg.infer.errors import UserError
from dfineseg.model.checkpoint import load_checkpoint, save_checkpoint
from dfineseg.overrides import ConfigError
from dfineseg.train.trainer import Trainer, TrainingDiverged
from dfineseg.utils.outputs import OutputConflictError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: training tests run on one thread


def _raw(data_yaml, project, name, **train):
    return {
        "data": {"path": str(data_yaml), "imgsz": 64, "workers": 0},
        "model": {"size": "tiny", "num_queries": 10, "num_denoising": 4},
        "eval": {"plots": False, "batch": 2},
        "train": {"epochs": 1, "batch": 2, "project": str(project), "name": name, "warmup_iters": 2,
                  "ema_warmup": 3, "seed": 5, "tensorboard": False, "plot_images": 0, "val_every": 100, **train},
    }


def _cfg(data_yaml, project, name, **train):
    return build_config(_raw(data_yaml, project, name, **train))


def _cli_args(data_yaml, project, name, *extra):
    return ["train", f"data={data_yaml}", "model.size=tiny", "imgsz=64", "workers=0", "batch=2", "epochs=2",
            "model.num_queries=10", "model.num_denoising=4", "train.tensorboard=false", "eval.plots=false",
            "train.plot_images=0", f"project={project}", f"name={name}", *extra]


def _finite_weights(ckpt) -> bool:
    # decoder.anchors holds +inf at invalid positions by design (the official layout).
    return all(bool(torch.isfinite(v).all()) for part in ("model", "ema") for k, v in (ckpt.get(part) or {}).items()
               if v.is_floating_point() and not k.endswith(("anchors", "valid_mask")))


# ---------------------------------------------------------------- 1. loader workers after validation
def test_loader_workers_with_validation_every_epoch_do_not_hang(small_data, tmp_path):
    """Validation (drawing predictions on full-size images) runs OpenCV's thread pool in the parent; workers
    forked after that deadlocked in cv2.setNumThreads at the start of epoch 2. A subprocess, so a hang is a
    timeout here and not a stuck test session."""
    cmd = [sys.executable, "-m", "dfineseg.cli", *_cli_args(small_data, tmp_path, "workers"),
           "epochs=3", "workers=2", "train.val_every=1", "train.plot_images=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its (hung) loader workers: its own session
        proc.communicate()
        pytest.fail("training with data.workers=2 and validation every epoch hung")
    assert proc.returncode == 0, err[-3000:]
    assert "epoch 3:" in err and (tmp_path / "workers" / "best.pt").is_file()


def test_a_script_without_main_guard_gets_told_how_to_fix_it(small_data, tmp_path):
    """Workers start from a fork server and import the user's script: one that trains at import time would
    train inside every worker. It is stopped there with the fix named."""
    script = tmp_path / "train_me.py"
    script.write_text(
        "import dfineseg.api as api\n"
        f"api.train(data={str(small_data)!r}, epochs=1, workers=1, batch=2, imgsz=64, project={str(tmp_path)!r},\n"
        "          name='script', **{'model.size': 'tiny', 'train.plot_images': 0, 'eval.plots': False,\n"
        "                            'train.tensorboard': False})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    assert "training was started while a data-loader worker imported your script" in res.stderr, res.stderr[-3000:]
    assert "UserError: a data-loader worker process died" in res.stderr  # the parent's error says it too


def test_dataset_travels_to_spawned_workers(small_data):
    import pickle

    from dfineseg.config import AugmentConfig
    from dfineseg.data import load_index
    from dfineseg.data.dataset import SegmentationDataset, worker_options

    ds = SegmentationDataset(load_index(small_data, "train"), 64, True, AugmentConfig(), seed=1, epochs=3)
    ds.set_epoch(1)  # the epoch travels with the copy each epoch's workers receive
    again = pickle.loads(pickle.dumps(ds))
    assert again.epoch == 1 and torch.equal(again[(0, (64, 64))][0], ds[(0, (64, 64))][0])
    assert worker_options(2)["multiprocessing_context"].get_start_method() in ("forkserver", "spawn")


# ---------------------------------------------------------------- 2. divergence
@pytest.mark.parametrize("save_every_steps", [None, 1])
def test_huge_lr_stops_with_one_clear_error_and_only_finite_checkpoints(small_data, tmp_path, capfd,
                                                                      save_every_steps):
    extra = ["lr=1e6"] + ([f"train.save_every_steps={save_every_steps}"] if save_every_steps else [])
    rc = cli.main(_cli_args(small_data, tmp_path, "lr", *extra))
    err = capfd.readouterr().err
    assert rc != 0
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    msg = errors[0]
    assert "training diverged" in msg and "learning rate" in msg and "lower it" in msg and "lr=" in msg
    assert "training finished" not in err
    run = tmp_path / "lr"
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            assert _finite_weights(load_checkpoint(run / name)), name
    if save_every_steps:
        assert str(run / "last.pt") in msg and load_checkpoint(run / "last.pt")["step"] >= 1
    else:
        assert "No checkpoint was written" in msg and "last.pt" not in msg and not (run / "last.pt").exists()


def test_non_finite_losses_in_half_of_recent_steps_stop_the_run(small_data, tmp_path):
    """Every other loss is NaN: never two in a row, never most of the steps, but half of the last 20."""
    calls = {"n": 0}

    def every_other(total, terms):
        calls["n"] += 1
        return (total * float("nan"), terms) if calls["n"] % 2 == 0 else (total, terms)

    with pytest.raises(TrainingDiverged, match="10 of the last 20 steps"):
        Trainer(_cfg(small_data, tmp_path, "half", epochs=10, batch=1, max_nonfinite=3),
                criterion_hook=every_other).fit()
    assert calls["n"] == 20
    assert _finite_weights(load_checkpoint(tmp_path / "half" / "last.pt"))


def test_non_finite_gradients_count_even_when_the_loss_is_finite(small_data, tmp_path):
    """sqrt(0 * w) adds 0 to the loss but NaN to the gradient: a finite loss must not reset the count."""

    class NanGradient:
        trainer = None

        def __call__(self, total, terms):
            weight = next(self.trainer.model.parameters())
            return total + torch.sqrt(weight.sum() * 0.0), terms

    hook = NanGradient()
    tr = Trainer(_cfg(small_data, tmp_path, "grad", epochs=3, max_nonfinite=10), criterion_hook=hook)
    hook.trainer = tr
    with pytest.raises(TrainingDiverged, match="2 of the 2 steps so far.*No checkpoint was written"):
        tr.fit()
    assert tr.step == 0 and not (tmp_path / "grad" / "last.pt").exists()


# ---------------------------------------------------------------- 3. checkpoint writes
def test_stale_temp_files_of_an_interrupted_save_are_removed_and_nothing_else(small_data, tmp_path):
    run = tmp_path / "stale"
    run.mkdir()
    stale = [".last.pt.ab12cd34.tmp", ".best.pt.x_9y8z7w.tmp", ".results.csv.0a1b2c3d.tmp"]
    kept = [".notes.tmp", ".last.pt.tmp", ".mine.pt.ab12cd34.tmp", "last.pt.ab12cd34.tmp"]
    for name in stale + kept:
        (run / name).write_bytes(b"x" * 16)
    Trainer(_cfg(small_data, tmp_path, "stale", exist_ok=True)).fit()
    assert not [n for n in stale if (run / n).exists()]
    assert all((run / n).read_bytes() == b"x" * 16 for n in kept)
    assert not [p.name for p in run.glob(".*.tmp") if p.name not in kept]


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/12: "
                 "file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_disk_full_during_a_checkpoint_save_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                                     failure):
    path = tmp_path / "last.pt"
    save_checkpoint({"config": {}, "names": ["a"], "model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as err:
        save_checkpoint({"config": {}, "names": ["a"], "model": {"w": torch.zeros(3)}}, path)
    msg = str(err.value)
    assert str(path) in msg and "No space left on device" in msg and "Free space" in msg and "kept" in msg
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_disk_full_while_training_exits_with_one_message(small_data, tmp_path, monkeypatch, capfd):
    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    rc = cli.main(_cli_args(small_data, tmp_path, "full", "epochs=1"))
    err = capfd.readouterr().err
    assert rc != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(tmp_path / "full" / "last.pt") in errors[0]
    assert "No space left on device" in errors[0]


# ---------------------------------------------------------------- 4. resume overrides
def test_resume_applies_epochs_and_refuses_settings_that_cannot_change(small_data, tmp_path, capfd):
    Trainer(_cfg(small_data, tmp_path, "r")).fit()
    last = tmp_path / "r" / "last.pt"
    first = load_checkpoint(last)
    assert (first["step"], first["total_epochs"]) == (2, 1)

    with pytest.raises(ConfigError) as err:
        api.train(resume=str(last), epochs=2, lr=0.5, workers=0)
    assert "train.lr" in str(err.value) and "cannot change on resume" in str(err.value)
    assert "model.weights=" in str(err.value)  # the way to train on with new settings
    assert load_checkpoint(last)["step"] == 2  # nothing ran

    # A run folder written before output ledgers existed resumes too (its checkpoint proves it is ours).
    (tmp_path / "r" / ".dfineseg-outputs").unlink()
    capfd.readouterr()
    api.train(resume=str(last), epochs=2, workers=0)
    assert "applying train.epochs 1 -> 2" in capfd.readouterr().err
    resumed = load_checkpoint(last)
    assert (resumed["step"], resumed["epoch"], resumed["total_epochs"]) == (4, 2, 2)
    assert resumed["config"]["train"]["epochs"] == 2


# ---------------------------------------------------------------- 5. the run folder
def test_run_folder_with_a_users_file_is_refused_before_training(small_data, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "results.csv").write_text("my own numbers\n")
    with pytest.raises(OutputConflictError, match=r"results\.csv.*not written by dfineseg"):
        Trainer(_cfg(small_data, tmp_path, "mine", exist_ok=True)).fit()
    assert (run / "results.csv").read_text() == "my own numbers\n"
    assert not (run / "config.yaml").exists() and not (run / "last.pt").exists()


def test_a_run_folder_an_earlier_dfineseg_wrote_is_adopted_on_an_exist_ok_rerun(small_data, tmp_path):
    from dfineseg.utils.outputs import LEDGER

    Trainer(_cfg(small_data, tmp_path, "old", exist_ok=True)).fit()
    run = tmp_path / "old"
    (run / LEDGER).unlink()  # as a folder written before output ledgers existed
    (run / "notes.txt").write_text("mine")
    Trainer(_cfg(small_data, tmp_path, "old", exist_ok=True)).fit()  # e.g. `make demo` again after an upgrade
    owned = (run / LEDGER).read_text().split()
    assert {"config.yaml", "results.csv", "last.pt", "best.pt"} <= set(owned) and "notes.txt" not in owned
    # Without dfineseg's config.yaml there is no evidence: a folder of the user's files stays untouchable.
    (run / LEDGER).unlink()
    (run / "config.yaml").write_text("my: settings\n")
    with pytest.raises(OutputConflictError, match="not written by dfineseg"):
        Trainer(_cfg(small_data, tmp_path, "old", exist_ok=True)).fit()
    assert (run / "config.yaml").read_text() == "my: settings\n"


def test_rerun_into_its_own_run_folder_works_and_inputs_are_protected(small_data, tmp_path):
    Trainer(_cfg(small_data, tmp_path, "own", exist_ok=True)).fit()
    again = Trainer(_cfg(small_data, tmp_path, "own", exist_ok=True))
    again.fit()
    assert again.run_dir == (tmp_path / "own").resolve() and again.step == 2
    # Starting weights inside the run folder are an input: never written over.
    best = tmp_path / "own" / "best.pt"
    before = best.read_bytes()
    raw = _raw(small_data, tmp_path, "own", exist_ok=True)
    raw["model"]["weights"] = str(best)
    with pytest.raises(OutputConflictError, match="inputs"):
        Trainer(build_config(raw)).fit()
    assert best.read_bytes() == before
