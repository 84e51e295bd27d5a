"""The training loop on the real model, criterion and data: exact resume, non-finite steps, run folder."""

from __future__ import annotations

import csv

import pytest
import torch

from dfineseg.config import build_config
from dfineseg.model.checkpoint import load_checkpoint
from dfineseg.train.trainer import Trainer, TrainingDiverged, increment_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: training tests run on one thread


def _cfg(data_yaml, project, name, **train):
    raw = {
        "data": {"path": str(data_yaml), "imgsz": 64, "workers": 0,
                 "augment": {"mosaic": {"p": 0.5}, "affine": {"p": 0.5}}},
        "model": {"size": "tiny", "num_queries": 10, "num_denoising": 6},
        "eval": {"plots": False, "batch": 2},
        "train": {"epochs": 2, "batch": 2, "project": str(project), "name": name, "warmup_iters": 2,
                  "ema_warmup": 3, "seed": 5, "tensorboard": False, "plot_images": 0, "save_every_steps": 1,
                  "val_every": 2,
                  **train},
    }
    return build_config(raw)


class _CrashAt:
    """Raises on the n-th criterion call, as a kill would interrupt the run mid-epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, total, terms):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("simulated kill")
        return total, terms


def test_resume_mid_epoch_equals_uninterrupted_run(small_data, tmp_path):
    """4 optimizer steps (2 epochs of 2 batches) in one run == 3 steps, a kill in the middle of epoch 2,
    and a resume from last.pt for the last step."""
    full = Trainer(_cfg(small_data, tmp_path, "full"))
    full.fit()
    assert full.step == 4

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(small_data, tmp_path, "cut"), criterion_hook=_CrashAt(4)).fit()
    cut_last = tmp_path / "cut" / "last.pt"
    saved = load_checkpoint(cut_last)
    assert (saved["step"], saved["epoch"], saved["epoch_batch"]) == (3, 1, 1)

    resumed = Trainer(_cfg(small_data, tmp_path, "cut", resume=str(cut_last)))
    resumed.fit()
    assert resumed.run_dir == (tmp_path / "cut").resolve() and resumed.step == 4

    _assert_same_training(load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(cut_last), steps=4)
    # The resumed run's results.csv continues the interrupted one: epochs 1 and 2, once each.
    with (tmp_path / "cut" / "results.csv").open() as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["1", "2"]


def _assert_same_training(a, b, steps):
    """Two last.pt files hold the same model, EMA, optimizer moments and schedule after `steps` steps."""
    for key in ("model", "ema"):
        for name, ta in a[key].items():
            tb = b[key][name]
            assert torch.allclose(ta.float(), tb.float(), rtol=1e-5, atol=1e-6, equal_nan=True), f"{key}.{name} differs"
    exp_avg = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    exp_avg_b = [s["exp_avg"] for s in b["optimizer"]["state"].values()]
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(exp_avg, exp_avg_b))
    assert a["scheduler"] == b["scheduler"] and a["ema_updates"] == b["ema_updates"] == steps


def test_last_pt_by_wall_time_mid_epoch_resumes_exactly(small_data, tmp_path):
    """train.checkpoint_minutes writes last.pt mid-epoch once that much time passed since the last one (here
    shorter than a step: after every step but an epoch's last, which the epoch end writes), with the
    bookkeeping of any mid-epoch checkpoint: a kill in epoch 2 resumes from step 3 to the same weights as
    an uninterrupted run. Without the rule (save_every_steps off) the last.pt of that kill is epoch 1's."""
    full = Trainer(_cfg(small_data, tmp_path, "full", save_every_steps=None))
    full.fit()
    assert full.step == 4

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(small_data, tmp_path, "off", save_every_steps=None, checkpoint_minutes=None),
                criterion_hook=_CrashAt(4)).fit()
    assert load_checkpoint(tmp_path / "off" / "last.pt")["step"] == 2

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(small_data, tmp_path, "cut", save_every_steps=None, checkpoint_minutes=1e-6),
                criterion_hook=_CrashAt(4)).fit()
    cut_last = tmp_path / "cut" / "last.pt"
    saved = load_checkpoint(cut_last)
    assert (saved["step"], saved["epoch"], saved["epoch_batch"]) == (3, 1, 1)
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # atomic writes leave no temp file behind

    resumed = Trainer(_cfg(small_data, tmp_path, "cut", save_every_steps=None, resume=str(cut_last)))
    resumed.fit()
    assert resumed.step == 4
    _assert_same_training(load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(cut_last), steps=4)


def test_non_finite_loss_is_skipped_and_counted(small_data, tmp_path):
    calls = {"n": 0}

    def nan_once(total, terms):
        calls["n"] += 1
        return (total * float("nan"), terms) if calls["n"] == 2 else (total, terms)

    tr = Trainer(_cfg(small_data, tmp_path, "nan1", epochs=1), criterion_hook=nan_once)
    tr.fit()
    ckpt = load_checkpoint(tmp_path / "nan1" / "last.pt")
    assert ckpt["nonfinite_steps"] == 1
    assert ckpt["step"] == 1  # 2 batches, one skipped
    # decoder.anchors holds +inf at invalid positions by design (the official layout); weights must be finite.
    assert all(torch.isfinite(v).all() for k, v in ckpt["model"].items() if v.is_floating_point() and "anchors" not in k)


def test_consecutive_non_finite_losses_stop_with_last_good_checkpoint(small_data, tmp_path):
    calls = {"n": 0}

    def nan_from_third(total, terms):
        calls["n"] += 1
        return (total * float("nan"), terms) if calls["n"] >= 3 else (total, terms)

    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite losses.*last\.pt"):
        Trainer(_cfg(small_data, tmp_path, "nan3", epochs=3, max_nonfinite=3, save_every_steps=1),
                criterion_hook=nan_from_third).fit()
    ckpt = load_checkpoint(tmp_path / "nan3" / "last.pt")
    assert ckpt["step"] == 2
    # decoder.anchors holds +inf at invalid positions by design (the official layout); weights must be finite.
    assert all(torch.isfinite(v).all() for k, v in ckpt["model"].items() if v.is_floating_point() and "anchors" not in k)


def test_run_folder_increments_unless_exist_ok(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp2").mkdir()
    assert increment_run_dir(tmp_path, "exp", exist_ok=False) == tmp_path / "exp3"
    assert increment_run_dir(tmp_path, "exp", exist_ok=True) == tmp_path / "exp"
    assert increment_run_dir(tmp_path, "new", exist_ok=False) == tmp_path / "new"


def test_resume_from_best_pt_is_refused(small_data, tmp_path):
    from dfineseg.model.checkpoint import CheckpointError

    Trainer(_cfg(small_data, tmp_path, "b", epochs=1)).fit()
    with pytest.raises(CheckpointError, match="last.pt"):
        Trainer(_cfg(small_data, tmp_path, "b2", resume=str(tmp_path / "b" / "best.pt"))).fit()


def test_bad_start_weights_name_the_file(small_data, tmp_path):
    from dfineseg.infer.errors import UserError

    bogus = tmp_path / "dfine_n_coco.pth"
    bogus.write_bytes(b"\x00" * 64)
    cfg = _cfg(small_data, tmp_path, "w")
    cfg.model.weights = str(bogus)
    with pytest.raises(UserError, match="dfine_n_coco.pth"):
        Trainer(cfg).fit()


def test_time_budget_overrides_epochs_and_ends_with_validation(small_data, tmp_path, capfd):
    tr = Trainer(_cfg(small_data, tmp_path, "budget", epochs=500, time=0.05, val_every=1000, tensorboard=True,
                      plot_images=1))
    best = tr.fit()
    # The dataset checks' summary is printed once per split at the start of the run.
    err = capfd.readouterr().err
    assert err.count(f"{tr.train_index.split}: {len(tr.train_index.images)} images") == 1
    # 3 seconds cannot hold 500 epochs: the schedule was refitted to what the budget holds (whole epochs, or
    # the steps that fit when the budget ends inside an epoch; a fallback stop keeps the plan it overran).
    assert tr.total_epochs < 500
    assert tr.schedule.total_steps < 500 * tr.steps_per_epoch
    assert tr.ema.total_steps == tr.schedule.total_steps
    assert best.is_file() and "val/mask_f1" in open(tmp_path / "budget" / "results.csv").readline()
    run = tmp_path / "budget"
    assert (run / "val" / "metrics.json").is_file()
    # The run folder a user opens: resolved config, both checkpoints, curves, drawn predictions, TensorBoard.
    for name in ("config.yaml", "last.pt", "results.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("val_pred_*.jpg")) and list((run / "tensorboard").glob("events.out.tfevents.*"))
    from dfineseg.config import load_config

    assert load_config(run / "config.yaml").train.time == 0.05


def test_budget_refit_plans_whole_epochs_then_a_partial_one_whose_decay_ends_in_time(small_data, tmp_path):
    # Called when an epoch's training ends (epochs 0..3 done here). An epoch that cannot finish must not
    # stretch the lr decay past the budget (found on the demo: the run ended with the lr raised from its
    # minimum again, 1e-4 -> 2.2e-4, for one partial epoch): whole epochs are planned, and what is left buys
    # a planned partial epoch whose decay ends on its last step.
    tr = Trainer(_cfg(small_data, tmp_path, "refit", epochs=50, time=1.0))
    tr._setup()
    spe = tr.steps_per_epoch
    assert spe == 2  # 4 images, batch 2: a step costs 5 s of a 10 s epoch
    tr.epoch, tr.epoch_times, tr._final_val_s = 3, [10.0, 10.0], 2.0
    tr._elapsed = lambda: 60.0 - 2.0 - 15.0  # 15 s left after the final validation: one epoch and one step
    tr._refit_to_budget(10.0)
    assert tr.total_epochs == 6
    assert tr.schedule.total_steps == 5 * spe + 1 and tr.ema.total_steps == 5 * spe + 1
    tr._elapsed = lambda: 60.0 - 2.0 - 4.0  # less than a step left: the epoch just trained is the last
    tr._refit_to_budget(10.0)
    assert tr.total_epochs == 4 and tr.schedule.total_steps == 4 * spe
    # The decay reaches its floor at the end of the epoch just trained.
    assert tr.schedule.factor(4 * spe) == pytest.approx(tr.tcfg.min_lr_frac)


def test_sampler_order_is_seeded_per_epoch_resumable_and_split_across_ranks():
    from dfineseg.train.sampler import ResumableBatchSampler

    s = ResumableBatchSampler(10, 3, seed=1)
    s.set_epoch(2)
    full = [[i for i, _ in b] for b in s]
    s.set_epoch(2, start_batch=2)
    assert [[i for i, _ in b] for b in s] == full[2:]  # a resume continues the same permutation
    s.set_epoch(3)
    assert [[i for i, _ in b] for b in s] != full  # a new order each epoch
    assert sorted(i for b in full for i in b) == list(range(10))
    ranks = [ResumableBatchSampler(10, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(0)
    parts = [[i for b in r for i, _ in b] for r in ranks]
    assert len({len(p) for p in parts}) == 1  # equal work per rank (padded like DistributedSampler)
    assert set().union(*parts) == set(range(10))


def test_multiscale_sizes_are_seeded_per_batch_and_survive_a_resume():
    from dfineseg.train.sampler import MultiScaleRule, ResumableBatchSampler

    rule = MultiScaleRule((320, 480), p=1.0, min_frac=0.5, max_frac=1.5, seed=1)
    sizes = rule.sizes()
    # Every size is a multiple of 32, spans 0.5x..1.5x of the height, and keeps the 320:480 aspect within
    # one 32-pixel rounding step of the width.
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes), sizes
    assert sizes[0][0] == 160 and sizes[-1][0] == 480 and (320, 480) in sizes, sizes
    assert all(abs(w - h * 480 / 320) <= 16 for h, w in sizes), sizes
    sampler = ResumableBatchSampler(10, 4, seed=1, scale=rule)
    epoch0 = _epoch(sampler, 0)
    assert [len(b) for b in epoch0] == [4, 4, 2] and len(sampler) == 3
    assert all(len({key[1] for key in batch}) == 1 for batch in epoch0)  # one size per batch
    assert epoch0 == _epoch(sampler, 0)  # deterministic for (seed, epoch)
    assert len({b[0][1] for e in range(4) for b in _epoch(sampler, e)}) > 1
    assert _epoch(sampler, 0, start_batch=1) == epoch0[1:]  # a resume gets the same sizes
    ranks = [ResumableBatchSampler(10, 2, seed=1, rank=r, world_size=2, scale=rule) for r in range(2)]
    assert [b[0][1] for b in _epoch(ranks[0], 1)] == [b[0][1] for b in _epoch(ranks[1], 1)]  # ranks agree
    # The sizes drawn are pinned: a run resumed by a newer version must see the sizes it would have seen.
    half = MultiScaleRule((320, 480), p=0.5, min_frac=0.5, max_frac=1.5, seed=1)
    assert [[half.size(e, b) for b in range(5)] for e in range(3)] == [
        [(320, 480), (320, 480), (384, 576), (320, 480), (448, 672)],
        [(256, 384), (320, 480), (320, 480), (288, 448), (416, 640)],
        [(480, 704), (320, 480), (320, 480), (320, 480), (224, 320)],
    ]
    off = ResumableBatchSampler(4, 2, scale=MultiScaleRule((320, 320), p=1.0, off_epoch=0))
    assert all(k[1] == (320, 320) for b in _epoch(off, 0) for k in b)
    assert all(k[1] is None for b in _epoch(ResumableBatchSampler(4, 2), 0) for k in b)  # the dataset's imgsz


def test_multiscale_rule_from_config_is_the_one_training_uses(small_data):
    from dfineseg.data import load_index
    from dfineseg.train.epoch_loader import training_data
    from dfineseg.train.sampler import MultiScaleRule

    cfg = _cfg(small_data, "unused", "x", seed=9)
    cfg.data.augment.multiscale.p = 0.5
    _, sampler = training_data(cfg, load_index(small_data, "train"))
    ms = cfg.data.augment.multiscale
    assert sampler.scale == MultiScaleRule((64, 64), p=0.5, min_frac=ms.min_frac, max_frac=ms.max_frac, seed=9,
                                           off_epoch=ms.off_epoch)
    cfg.data.augment.multiscale.p = 0.0
    _, sampler = training_data(cfg, load_index(small_data, "train"))
    assert {k[1] for e in range(3) for b in _epoch(sampler, e) for k in b} == {(64, 64)}  # off: data.imgsz


def _epoch(sampler, epoch, start_batch=0):
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


class _ScriptedValidation(Trainer):
    """Validation returns a scripted sequence of the best metric, one value per epoch (real training steps,
    real checkpoints), so early stopping is judged on a metric that moves."""

    SCRIPT = (0.2, 0.5, 0.4, 0.45, 0.9)

    def validate(self, out_dir=None, model=None):
        value = self.SCRIPT[min(self.epoch, len(self.SCRIPT) - 1)]
        return {self.best_metric: value, "f1": value}


def test_early_stopping_after_patience_epochs_without_improvement(small_data, tmp_path):
    tr = _ScriptedValidation(_cfg(small_data, tmp_path, "patience", epochs=10, patience=2, val_every=1))
    tr.fit()
    # 0.5 at epoch 2 is the best; epochs 3 and 4 do not beat it, so the run stops before 0.9 at epoch 5.
    assert tr.epoch == 4 and tr.best_epoch == 1 and "early stopping" in tr.stop_reason, (tr.epoch, tr.stop_reason)
    best = load_checkpoint(tr.run_dir / "best.pt")
    assert best["best_fitness"] == pytest.approx(0.5) and best["epoch"] == 2
    assert load_checkpoint(tr.run_dir / "last.pt")["epoch"] == 4


class _TiedPrimary(Trainer):
    """mask F1 at conf 0.5 stays 0 (no score reaches 0.5, as on a young model) while the sweep's best F1 and
    mask mAP rise until epoch 3 and fall after: real training steps and checkpoints, scripted metrics."""

    SCRIPT = ((0.0003, 0.0), (0.02, 0.004), (0.089, 0.015), (0.05, 0.01))

    def validate(self, out_dir=None, model=None):
        best_f1, mean_ap = self.SCRIPT[min(self.epoch, len(self.SCRIPT) - 1)]
        return {"mask_f1": 0.0, "box_f1": 0.0, "best_f1": best_f1, "mask_map50_95": mean_ap}


def test_best_pt_breaks_ties_of_the_best_metric_and_keeps_them_across_a_resume(small_data, tmp_path, capfd):
    """The default best_metric (mask F1 at 0.5) ties at 0: best.pt must still hold the best epoch (the
    highest best_f1, then mAP), and a resume compares against the stored tuple, not the tied float."""
    tr = _TiedPrimary(_cfg(small_data, tmp_path, "tie", epochs=3, val_every=1, save_every_steps=None))
    tr.fit()
    assert tr.best_epoch == 2 and load_checkpoint(tr.run_dir / "best.pt")["epoch"] == 3
    err = capfd.readouterr().err
    assert "best.pt holds epoch 3 of 3" in err and "2 other epoch(s) tied on mask_f1; best_f1 decided" in err, err
    with (tr.run_dir / "results.csv").open() as fh:
        assert [row["best_epoch"] for row in csv.DictReader(fh)] == ["1", "2", "3"]

    # Epoch 4 ties on mask F1 again, with a lower best_f1: best.pt keeps epoch 3.
    again = _TiedPrimary(_cfg(small_data, tmp_path, "tie", epochs=4, val_every=1, save_every_steps=None,
                              resume=str(tr.run_dir / "last.pt")))
    again.fit()
    assert again.best_epoch == 2 and load_checkpoint(tr.run_dir / "best.pt")["epoch"] == 3
    assert load_checkpoint(tr.run_dir / "last.pt")["best_key"] == [0.0, 0.089, 0.015]
    assert "best.pt holds epoch 3 of 4" in capfd.readouterr().err


def test_best_key_of_an_older_checkpoint_is_its_float_with_unknown_tie_breakers():
    from dfineseg.train.best_model import fitness_key, key_from_checkpoint, ranking_metrics

    names = ranking_metrics("mask_f1", "segment")
    assert names == ("mask_f1", "best_f1", "mask_map50_95")
    assert ranking_metrics("best_f1", "detect") == ("best_f1", "box_map50_95")
    old = key_from_checkpoint({"best_fitness": 0.0}, names)
    assert old == (0.0, float("-inf"), float("-inf"))
    # A later epoch that ties on the float and measured its tie-breakers replaces it; a lower one does not.
    assert fitness_key({"mask_f1": 0.0, "best_f1": 0.01, "mask_map50_95": 0.0}, names) > old
    assert fitness_key({"mask_f1": -0.1, "best_f1": 0.9, "mask_map50_95": 0.9}, names) < old
    # A NaN never wins.
    assert fitness_key({"mask_f1": float("nan")}, names) < fitness_key({"mask_f1": 0.0}, names)
    assert key_from_checkpoint({"best_fitness": None}, names) is None
