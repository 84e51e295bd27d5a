"""The run's length: elapsed training time across resumes, the `time=` budget, and planning the number of
epochs so the lr schedule and the EMA horizon end when the run does.

With `train.time` the run is first planned from the speed of its first optimizer steps, then refitted
after each epoch; rank 0's decision is broadcast so every rank agrees. `Trainer` (trainer.py) mixes this
in; `_loop` sets `_t_start`, `_final_val_s`, `_budget_fitted`, `_first_step` and `_elapsed_at_start`.
"""

from __future__ import annotations

import math
import sys
import time

from dfineseg.train import distributed as D


class TimeBudget:
    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t_start)

    def _budget_s(self) -> float | None:
        return self.tcfg.time * 60.0 if self.tcfg.time else None

    def _plan_epochs(self, total: int) -> None:
        """Set the run's length in epochs; the lr schedule and the EMA horizon follow it."""
        if total != self.total_epochs:
            self.total_epochs = total
            self.schedule.set_total(self.total_epochs * self.steps_per_epoch)
            if self.ema is not None:
                self.ema.total_steps = self.schedule.total_steps

    def _refit_to_budget(self, this_epoch_s: float) -> None:
        """`time=`: when an epoch's training ends (before its validation and before `self.epoch` moves on),
        set the total epochs so the run ends inside the budget and refit the schedule's length; rank 0
        decides so every rank agrees. Epochs 0..self.epoch are done, so only whole epochs that still fit are
        added: an epoch that cannot finish would stretch the decay past the budget's end (the run would stop
        with the learning rate raised again), and deciding before validation lets the epoch that becomes the
        last one be validated like any last epoch."""
        budget = self._budget_s()
        if budget is None:
            return
        recent = (self.epoch_times + [this_epoch_s])[-3:]
        per_epoch = sum(recent) / len(recent)
        remaining = budget - self._elapsed() - self._final_val_s
        total = self.epoch + 1 + max(0, int(remaining // max(per_epoch, 1e-6)))
        total = D.broadcast_object(total)
        self._plan_epochs(total)

    def _refit_from_steps(self, budget: float) -> None:
        """`time=`: a first fit from the speed of the first optimizer steps, so even a budget shorter than
        one epoch gets a schedule (warm-up, decay) that ends on time; epochs refine it afterwards."""
        self._budget_fitted = True
        done = self.step - self._first_step
        per_step = max(self._elapsed() - self._elapsed_at_start, 1e-6) / done
        remaining = max(0.0, budget - self._elapsed())
        total_steps = self.step + int(remaining // per_step)
        total = max(self.epoch + 1, math.ceil(total_steps / self.steps_per_epoch))
        total = D.broadcast_object(total)
        if self.is_main:
            # Say what the budget buys: on a busy machine the same minutes give fewer steps (and a weaker
            # model), which should not come as a surprise at the end.
            from tqdm import tqdm

            tqdm.write(f"time budget {budget / 60:.1f} min: {per_step:.2f} s/step so far -> planning {total} "
                       f"epochs ({total * self.steps_per_epoch} steps); refitted after each epoch", file=sys.stderr)
        self._plan_epochs(total)
