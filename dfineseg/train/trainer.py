"""The training loop: data -> model -> criterion -> AdamW, with EMA, AMP, accumulation, validation each
epoch through the evaluation core, atomic checkpoints, exact resume, time budgets and DDP.

`Trainer(cfg).fit()` -> best.pt. This module owns the order of events of a run and of each epoch (train,
budget decision, validation, end of epoch: results row, checkpoints, early stopping); the parts live next
to it, one job each: `setup` (building the run), `step_loop` (one epoch of optimizer steps), `budget`
(the run's length under `time=`), `run_state` (the checkpoint's contents and resume), `validation` (the
evaluation hook and the final report).

Order of events inside one optimizer step (the resume contract depends on it): `accumulate` micro-batches
(forward, fp32 loss, backward), then unscale + clip, optimizer step, schedule step, EMA update. A
checkpoint is written only at a step boundary, with the number of batches consumed in the epoch, so a
resume skips exactly those batches of the same seeded permutation and restores every RNG.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

from dfineseg.infer.errors import UserError
from dfineseg.model.checkpoint import CheckpointError, load_checkpoint
from dfineseg.train import distributed as D
from dfineseg.train.best_model import explain_best
from dfineseg.train.budget import TimeBudget
from dfineseg.train.divergence import NONFINITE_WINDOW, NONFINITE_WINDOW_SHARE, TrainingDiverged
from dfineseg.train.results import save_prediction_images
from dfineseg.train.resume import RESUME_CHANGEABLE, RESUME_FREE_SECTIONS, resume_config
from dfineseg.train.run_folder import increment_run_dir, remove_stale_temp_files
from dfineseg.train.run_state import RunState
from dfineseg.train.setup import RunSetup, default_best_metric, seed_everything
from dfineseg.train.short_budget import apply_short_budget
from dfineseg.train.short_budget import describe as describe_choices
from dfineseg.train.step_loop import StepLoop, memory_text, split_losses, targets_to
from dfineseg.train.validation import ValidationHook

# The public names, with those that live in the parts (divergence, resume, run_folder, setup, step_loop):
# callers and tests still import them from here.
__all__ = [
    "NONFINITE_WINDOW", "NONFINITE_WINDOW_SHARE", "RESUME_CHANGEABLE", "RESUME_FREE_SECTIONS", "Trainer",
    "TrainingDiverged", "default_best_metric", "increment_run_dir", "memory_text", "remove_stale_temp_files",
    "seed_everything", "split_losses", "targets_to",
]

# The metrics printed after each validated epoch.
_SHOWN = {"mask_f1", "box_f1", "mask_map50_95", "box_map50_95", "best_f1"}


class Trainer(RunSetup, StepLoop, TimeBudget, RunState, ValidationHook):
    """`Trainer(cfg).fit()` -> Path of best.pt. `cfg.train.resume=runs/x/last.pt` continues that run."""

    def __init__(self, cfg: Any, criterion_hook: Any = None) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # A loader worker is importing the user's script (workers start from a fork server, see
            # dfineseg.data.dataset.worker_context): the script runs training at import time.
            raise UserError(
                "training was started while a data-loader worker imported your script: put the code that calls "
                "dfineseg.api.train() / Trainer under `if __name__ == \"__main__\":`, or set data.workers=0"
            )
        if cfg.train.gpus > 1 and not D.launched_by_torchrun():
            raise UserError(
                f"train.gpus={cfg.train.gpus} needs one process per GPU: run `make train GPUS={cfg.train.gpus}` or "
                f"`torchrun --standalone --nproc_per_node={cfg.train.gpus} -m dfineseg.cli train ...`"
            )
        self.dist = D.init_distributed(cfg.train.device)
        self.resume_ckpt: dict[str, Any] | None = None
        self.resume_epochs: int | None = None
        if cfg.train.resume:
            self.resume_ckpt = load_checkpoint(cfg.train.resume)
            if self.resume_ckpt.get("optimizer") is None:
                raise CheckpointError(f"{cfg.train.resume}: holds no optimizer state (best.pt); resume from last.pt")
            cfg, self.resume_epochs = resume_config(cfg, self.resume_ckpt, self.dist.is_main)
        cfg, self.budget_choices = apply_short_budget(cfg, resuming=self.resume_ckpt is not None,
                                                      on_cpu=self.dist.device.type == "cpu")
        if self.budget_choices and self.dist.is_main:
            print(describe_choices(self.budget_choices, cfg.train.time), file=sys.stderr)
        self.cfg = cfg
        self.tcfg = cfg.train
        self.device = self.dist.device
        # A test may wrap the criterion (e.g. to inject a NaN); users never need this.
        self.criterion_hook = criterion_hook
        self.stop_reason = ""

    # ------------------------------------------------------------------ the run
    def fit(self) -> Path:
        # The clock starts before the setup: `time=` budgets the whole command (data checks, model building).
        self._t_start = self._now()
        try:
            self._setup()
            self._loop()
            return self.run_dir / "best.pt"
        finally:
            if getattr(self, "is_main", False) and hasattr(self, "log"):
                self.log.close()
            D.cleanup()

    def _loop(self) -> None:
        tcfg = self.tcfg
        budget = self._budget_s()
        if budget is not None and self.resume_ckpt is None:
            # Until the first epoch is measured, plan for the configured epochs (refit afterwards).
            self.total_epochs = max(tcfg.epochs, 1)
        self._budget_fitted = self.resume_ckpt is not None
        if budget is not None:
            self._start_budget()
        self._first_step, self._elapsed_at_start = self.step, self._elapsed()
        self._last_save_t = self._now()
        stop = False
        while self.epoch < self.total_epochs and not stop:
            t_epoch = self._now()
            stop = self._train_epoch()
            if stop and self._validated_step == self.step:
                break  # the budget allowed no step since these weights were validated and logged: nothing to add
            finished_epoch = self.epoch_batch >= self.sampler.batches_per_epoch()
            if finished_epoch or stop:
                train_s = self._now() - t_epoch
                # Decide on the budget before validating, so the epoch that ends the run is validated and
                # logged like any last epoch.
                if (not stop and budget is not None and self.epoch + 1 < self.total_epochs
                        and D.broadcast_object(self._elapsed() + self._final_val_s >= budget)):
                    self._stop_for_budget(budget)
                    stop = True
                if not stop and finished_epoch:
                    self._refit_to_budget(train_s)
                last_epoch = self.epoch + 1 >= self.total_epochs
                metrics: dict[str, float] = {}
                if stop or last_epoch or (self.epoch + 1) % tcfg.val_every == 0:
                    t_val = self._now()
                    metrics = self.validate()
                    self._note_validation(self._now() - t_val)
                    self._validated_step = self.step
                if finished_epoch:
                    self.epoch_times.append(train_s)  # training only: the budget adds validations and writes
                t_end = self._now()
                stop = self._end_epoch(metrics) or stop
                self._note_writes(self._now() - t_end)
                # The reserve may have grown with this epoch's validation: a validated epoch whose successor
                # could not train one step ends the run here (an unvalidated one goes on, and the next
                # epoch's first check stops it and validates these weights).
                if (not stop and budget is not None and metrics and self.epoch < self.total_epochs
                        and not D.all_true(self._next_step_fits(budget), self.device)):
                    self._stop_for_budget(budget)
                    stop = True
        self._finish()

    def _end_epoch(self, metrics: dict[str, float]) -> bool:
        """Log, save last/best, early stopping. True to stop."""
        stop = False
        if metrics:
            self.last_metrics = metrics
        fitness = self._fitness(metrics)  # a tuple: best_metric, then the tie-breakers (best_model.py)
        improved = fitness is not None and (self.best_key is None or fitness > self.best_key)
        if fitness is not None:
            self.fitness_history.append((self.epoch, fitness))
        if improved:
            self.best_key, self.best_fitness, self.best_epoch = fitness, fitness[0], self.epoch
        finished_epoch = self.epoch_batch >= self.sampler.batches_per_epoch()
        done_epoch = self.epoch
        if finished_epoch:
            self.epoch, self.epoch_batch = self.epoch + 1, 0
        if self.is_main:
            row: dict[str, Any] = {"epoch": done_epoch + 1, "step": self.step, "time_s": round(self._elapsed(), 1)}
            row.update({f"train/{k}": v for k, v in getattr(self, "epoch_losses", {}).items()})
            for group in self.optimizer.param_groups:
                row[f"lr/{group.get('name', 'group')}"] = group["lr"]
            row.update({f"val/{k}": v for k, v in metrics.items()})
            if self.divergence.total:
                row["nonfinite_steps"] = self.divergence.total
            if self.best_epoch >= 0:
                row["best_epoch"] = self.best_epoch + 1  # the epoch best.pt holds after this one
            self.log.add(row)
            # The plot is redrawn at most every 2 minutes (and at the end): on a small CPU it costs seconds.
            if time.perf_counter() - self._last_plot > 120:
                self.log.plot()
                self._last_plot = time.perf_counter()
            if (not finished_epoch or self.epoch % self.tcfg.save_every_epochs == 0 or self.epoch >= self.total_epochs
                    or self._checkpoint_due()):
                self.save_last()
            if improved or "best.pt" not in self.saved_checkpoints:
                self._save("best.pt", with_optimizer=False)
                if self.tcfg.plot_images and getattr(self, "_last_val_preds", None) is not None:
                    n = self.tcfg.plot_images
                    # Drawn at the sweep's best threshold: predictions are made at 0.01 for mAP.
                    conf = metrics.get("best_conf", self.cfg.eval.conf)
                    shown = [d.filter(d.scores >= conf) for d in self._last_val_preds[:n]]
                    save_prediction_images(self.val_index.images[:n], shown, self.names, self.run_dir,
                                           outputs=self.outputs)
            if metrics:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in _SHOWN)
                print(f"epoch {done_epoch + 1}: {shown or self.best_metric} (best {self.best_metric} "
                      f"{self.best_fitness:.4f} at epoch {self.best_epoch + 1})", file=sys.stderr)
        if self.tcfg.patience and fitness is not None and self.epoch - 1 - self.best_epoch >= self.tcfg.patience:
            self.stop_reason = f"early stopping: no improvement in {self.tcfg.patience} epochs"
            stop = True
        return D.broadcast_object(stop)

    def _finish(self) -> None:
        if self.is_main:
            if self.tcfg.save_every_epochs > 1:
                self.save_last()  # the final state, whatever the save period
            best = self.run_dir / "best.pt"
            if "best.pt" not in self.saved_checkpoints:
                self._save("best.pt", with_optimizer=False)
            self.log.plot()
            reason = self.stop_reason or f"{self.epoch} epochs completed"
            print(f"training finished ({reason}) in {self._elapsed() / 60:.1f} min; best {self.best_metric} "
                  f"{self.best_fitness if self.best_fitness is not None else float('nan'):.4f} -> {best}",
                  file=sys.stderr)
            epochs_run = self.epoch + (1 if self.epoch_batch else 0)  # a stopped epoch counts
            print(explain_best(self.best_epoch, self.best_key, self.fitness_history, self.ranking, epochs_run),
                  file=sys.stderr)
            self._final_report(best)
        D.barrier()
