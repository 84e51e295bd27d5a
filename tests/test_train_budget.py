"""`time=` is a promise about the whole command: training, validations, checkpoints and the final report of
best.pt end within the budget. Real training steps, validations and checkpoints run here; the clock the
budget reads is a scripted one (every optimizer step and every predicted val image costs fixed seconds),
so the decisions are the same on any CPU and under any load (a test never times real work)."""

from __future__ import annotations

import csv

import pytest

from dfineseg.config import build_config
from dfineseg.model.checkpoint import load_checkpoint
from dfineseg.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: training tests run on one thread

STEP_S = 2.0  # scripted seconds of one optimizer step
IMAGE_S = 0.5  # scripted seconds of one predicted val image (2 val images: a validation costs 1 s)


def _cfg(data_yaml, project, name, **train):
    raw = {
        "data": {"path": str(data_yaml), "imgsz": 64, "workers": 0},
        "model": {"size": "tiny", "num_queries": 10, "num_denoising": 4},
        "eval": {"plots": False, "batch": 2},
        "train": {"epochs": 50, "batch": 1, "project": str(project), "name": name, "warmup_iters": 1,
                  "ema_warmup": 3, "seed": 5, "tensorboard": False, "plot_images": 0, "val_every": 1, **train},
    }
    return build_config(raw)


class _ScriptedClock(Trainer):
    """The budget's clock advances only by scripted costs: STEP_S per optimizer step, IMAGE_S per image the
    validation, the validation-time probe or the final report predicts."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.clock = 0.0

    def _now(self):
        return self.clock

    def _optimizer_step(self):
        super()._optimizer_step()
        self.clock += STEP_S

    def _predictor(self, net):
        predict = super()._predictor(net)

        def scripted(images):
            self.clock += IMAGE_S * len(images)
            return predict(images)

        return scripted


def test_budget_shorter_than_an_epoch_stops_mid_epoch_in_time_for_the_final_validation(small_data, tmp_path,
                                                                                        capfd):
    """9 s; an epoch is 4 steps of 2 s: the first epoch alone would overrun. The old rule trained the epoch
    and validated after it (8 s of steps, then the epoch's validation and the final report: 10 s). Now the run
    stops before the step that would eat into the reserve, validates, writes last.pt/best.pt and reports
    best.pt inside the budget; the schedule was fitted to the steps that fit, so its decay ended."""
    tr = _ScriptedClock(_cfg(small_data, tmp_path, "short", time=0.15))
    tr.fit()
    budget = 0.15 * 60
    assert tr.clock <= budget * 1.05, tr.clock  # setup costs 0 s on this clock: no allowance needed
    assert tr.step == 2 and tr.epoch_batch == 2 and tr.sampler.batches_per_epoch() == 4
    err = capfd.readouterr().err
    reason = "time budget: stopped at epoch 1 step 2 (batch 2 of 4) to leave 2 s for the final validation"
    assert reason in err and f"training finished ({reason}" in err, err[-2000:]
    assert tr.schedule.total_steps == 2 and tr.schedule.factor(tr.step) == pytest.approx(tr.tcfg.min_lr_frac)

    # The stop left an ordinary mid-epoch checkpoint and a validated best.pt.
    run = tr.run_dir
    last = load_checkpoint(run / "last.pt")
    assert (last["step"], last["epoch"], last["epoch_batch"]) == (2, 0, 2)
    assert load_checkpoint(run / "best.pt")["step"] == 2 and (run / "val" / "metrics.json").is_file()
    with (run / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["val/mask_f1"] != ""

    # Resumable: the resumed run knows the budget is spent (elapsed time, step and validation times are in
    # last.pt), trains no step, keeps the validated weights and only reports best.pt again.
    (run / "val" / "metrics.json").unlink()
    again = _ScriptedClock(_cfg(small_data, tmp_path, "short", time=0.15, resume=str(run / "last.pt")))
    again.fit()
    assert again.step == 2 and again.elapsed_before + again.clock <= budget * 1.05
    assert (run / "val" / "metrics.json").is_file()
    assert reason in capfd.readouterr().err


def test_budget_plan_keeps_the_reserve_and_ends_on_an_epoch(small_data, tmp_path, capfd):
    """Enough for a few whole epochs: the plan (from the first steps, then each epoch) leaves the final
    validation's time, so the run ends on an epoch boundary with its decay finished, within the budget."""
    # 31 s; an epoch: 8 s + 1 s validation; what is left after three epochs buys no step
    tr = _ScriptedClock(_cfg(small_data, tmp_path, "epochs", time=31 / 60))
    tr.fit()
    assert tr.clock <= 31 * 1.05, tr.clock
    assert tr.epoch_batch == 0 and tr.epoch == tr.total_epochs >= 2
    assert tr.schedule.total_steps == tr.step == tr.total_epochs * tr.steps_per_epoch
    assert "time budget: stopped" not in capfd.readouterr().err  # the plan held: no fallback stop


def test_time_left_after_the_whole_epochs_buys_a_planned_partial_epoch(small_data, tmp_path, capfd):
    """35 s; an epoch is 4 steps of 2 s plus a 1 s validation, the reserve 2 s. After three epochs 6 s are
    left: not a whole epoch, but two steps and their validation. The plan takes them (14 steps), the lr decay
    ends on step 14, the run stops there at a step boundary and reports within the budget; before, those
    seconds went unused (12 steps)."""
    tr = _ScriptedClock(_cfg(small_data, tmp_path, "partial", time=35 / 60))
    tr.fit()
    assert tr.clock <= 35 * 1.05, tr.clock
    assert tr.step == 14 and tr.epoch_batch == 2 and tr.total_epochs == 4
    assert tr.schedule.total_steps == 14 and tr.schedule.factor(tr.step) == pytest.approx(tr.tcfg.min_lr_frac)
    assert "time budget: stopped at epoch 4 step 14 (batch 2 of 4)" in capfd.readouterr().err
