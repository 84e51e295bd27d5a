"""The run's length: elapsed time across resumes, the `time=` budget, and planning the number of epochs so
the lr schedule and the EMA horizon end when the run does.

`time=T` is a promise about the whole command: setup, training, every validation, the checkpoints and the
final report of best.pt end within T. The run keeps a reserve for what follows its last optimizer step
(that epoch's validation and writes, then the final report), estimated from measurements: the last
validation (before the first one, a few val images predicted and scored, scaled to the split), the slowest
end-of-epoch writes and checkpoint saves, the slowest recent steps.

The plan comes first: from the speed of the first optimizer steps, then refitted after each epoch, the run
is given the whole epochs that fit before the reserve, plus a last partial epoch when the time left buys at
least a fifth of one, so the lr decay ends with the run (a budget that ends inside the planned last epoch,
one shorter than an epoch say, decays over the steps that fit, and the run stops there at a step boundary). When the plan overruns anyway (a machine that slowed down, a validation slower than
estimated) the run stops at a step boundary, before a step that would eat into the reserve, and says so;
its last.pt is an ordinary mid-epoch checkpoint. Every decision is rank 0's broadcast, or all ranks'
agreement, so every rank stops together.

`Trainer` (trainer.py) mixes this in; `fit` sets `_t_start` and `_loop` calls `_start_budget`.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque

from dfineseg.train import distributed as D

# The final report scores best.pt once more and writes every output (metrics.json, predictions.json with
# RLE masks, plots): about one validation (demo config, 60 val images, 2 busy CPU cores: validations of
# 19.4 and 25.3 s, final reports of 19.5 and 13.3 s); its files and plots are in the writes' share.
FINAL_REPORT_FACTOR = 1.0
# Recent optimizer steps whose slowest one stands for the next step (a busy machine's steps vary).
STEP_WINDOW = 5
# A last, partial epoch is planned when the time left after the whole epochs buys at least this share of an
# epoch's steps (less would only shorten the flat part of the schedule).
PARTIAL_EPOCH_MIN_SHARE = 0.2


class TimeBudget:
    def _now(self) -> float:
        """The one clock of every budget decision (a test replaces it)."""
        return time.perf_counter()

    def _elapsed(self) -> float:
        return self.elapsed_before + (self._now() - self._t_start)

    def _budget_s(self) -> float | None:
        return self.tcfg.time * 60.0 if self.tcfg.time else None

    # ------------------------------------------------------------------ measurements and the reserve
    def _start_timing(self) -> None:
        """The measurements start empty (a test may call `_setup` alone and set them)."""
        self._val_s: float | None = None  # the last validation's seconds (or the probe's estimate)
        self._write_s = 0.0  # the slowest end-of-epoch bookkeeping or checkpoint save
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._final_val_s = 0.0  # the reserve: seconds the run needs after its last optimizer step
        self._validated_step = -1  # the optimizer step whose weights were validated last

    def _start_budget(self) -> None:
        """`time=`: before the first step, estimate a validation (unless a resumed run measured one) and the
        reserve."""
        if self._val_s is None:
            self._val_s = self._estimate_validation_s()
        self._update_reserve()

    def _update_reserve(self) -> None:
        val = self._val_s or 0.0
        # That epoch's validation and writes, then the final report and the last writes (_finish).
        self._final_val_s = (1.0 + FINAL_REPORT_FACTOR) * val + 2.0 * self._write_s

    def _note_validation(self, seconds: float) -> None:
        self._val_s = seconds
        self._update_reserve()

    def _note_writes(self, seconds: float) -> None:
        if seconds > self._write_s:
            self._write_s = seconds
            self._update_reserve()

    def _note_step(self, seconds: float) -> None:
        self._step_times.append(seconds)

    def _next_step_fits(self, budget: float) -> bool:
        """True if one more optimizer step (the slowest of the recent ones) ends before the reserve."""
        step = max(self._step_times, default=0.0)
        return self._elapsed() + step + self._final_val_s <= budget

    def _stop_for_budget(self, budget: float) -> None:
        """Record (and print) why the run stops before its plan: the next step would eat into the reserve.
        Called at a step boundary: inside an epoch, when an epoch's training ended, or after its end."""
        n_batches = self.sampler.batches_per_epoch()
        if 0 < self.epoch_batch < n_batches:
            where, epochs = (f"epoch {self.epoch + 1} step {self.step} (batch {self.epoch_batch} of {n_batches})",
                             self.epoch + 1)
        else:  # an epoch whose training ended (epoch not yet counted), or one counted and not begun
            done = self.epoch + 1 if self.epoch_batch else self.epoch
            where, epochs = f"the end of epoch {done} (step {self.step})", max(done, 1)
        if not self._budget_fitted and self.step > self._first_step:
            self._refit_from_steps(budget)  # stopped before the first fit: the schedule on record fits the run
        # The planned epochs become those that ran; the schedule stays the one the steps followed.
        self._budget_fitted = True
        self.total_epochs = epochs
        self.stop_reason = (f"time budget: stopped at {where} to leave {self._final_val_s:.0f} s for the final "
                            f"validation ({self.tcfg.time:g} min budget, {self._elapsed():.0f} s used)")
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(self.stop_reason, file=sys.stderr)

    # ------------------------------------------------------------------ the plan
    def _plan_epochs(self, total: int, steps: int | None = None) -> None:
        """Set the run's length in epochs; the lr schedule and the EMA horizon follow it: over `steps` when
        the budget ends inside the last planned epoch (the run will stop there), else over whole epochs."""
        self.total_epochs = total
        self.schedule.set_total(steps if steps is not None else total * self.steps_per_epoch)
        if self.ema is not None:
            self.ema.total_steps = self.schedule.total_steps

    def _refit_to_budget(self, this_epoch_s: float) -> None:
        """`time=`: when an epoch's training ends (before its validation and before `self.epoch` moves on),
        set the total epochs so the run ends inside the budget and refit the schedule's length; rank 0
        decides so every rank agrees. Epochs 0..self.epoch are done, so only whole epochs that still fit are
        added: an epoch that cannot finish would stretch the decay past the budget's end (the run would stop
        with the learning rate raised again), and deciding before validation lets the epoch that becomes the
        last one be validated like any last epoch. An added epoch costs its training (the mean of the last
        three) plus its share of validations and its writes; the reserve pays for this epoch's end and the
        final report."""
        budget = self._budget_s()
        if budget is None:
            return
        recent = (self.epoch_times + [this_epoch_s])[-3:]
        train_epoch = sum(recent) / len(recent)
        per_epoch = train_epoch + (self._val_s or 0.0) / self.tcfg.val_every + self._write_s
        remaining = budget - self._elapsed() - self._final_val_s
        whole = max(0, int(remaining // max(per_epoch, 1e-6)))
        total = self.epoch + 1 + whole
        # What is left after the whole epochs buys a last, partial epoch: its steps, after the validation and
        # writes of the epoch before it (the reserve pays for the partial epoch's own). Up to an epoch of a
        # short budget would otherwise go unused; the run stops inside it at a step boundary, as planned.
        per_step = train_epoch / max(self.steps_per_epoch, 1)
        left = remaining - whole * per_epoch - (self._val_s or 0.0) - self._write_s
        extra = int(max(0.0, left) // max(per_step, 1e-6)) if whole or remaining > 0 else 0
        extra = min(extra, self.steps_per_epoch - 1)
        partial = extra >= 1 and extra >= PARTIAL_EPOCH_MIN_SHARE * self.steps_per_epoch
        total, extra, partial = D.broadcast_object((total, extra, partial))
        if partial:
            self._plan_epochs(total + 1, total * self.steps_per_epoch + extra)
        else:
            self._plan_epochs(total)

    def _refit_from_steps(self, budget: float) -> None:
        """`time=`: a first fit from the speed of the first optimizer steps, so even a budget shorter than
        one epoch gets a schedule (warm-up, decay) that ends on time; epochs refine it afterwards."""
        self._budget_fitted = True
        done = self.step - self._first_step
        per_step = max(self._elapsed() - self._elapsed_at_start, 1e-6) / done
        remaining = max(0.0, budget - self._elapsed() - self._final_val_s)
        total_steps = self.step + int(remaining // per_step)
        total = max(self.epoch + 1, math.ceil(total_steps / self.steps_per_epoch))
        total, total_steps = D.broadcast_object((total, total_steps))
        # A budget that ends inside the last planned epoch (shorter than one epoch, or an epoch and a part)
        # ends the decay with the budget; whole epochs replace this plan once one epoch is measured.
        steps = min(total_steps, total * self.steps_per_epoch)
        if self.is_main:
            # Say what the budget buys: on a busy machine the same minutes give fewer steps (and a weaker
            # model), which should not come as a surprise at the end.
            from tqdm import tqdm

            tqdm.write(f"time budget {self.tcfg.time:g} min: {per_step:.2f} s/step so far, {self._final_val_s:.0f} s "
                       f"kept for the final validation -> planning {total} epoch(s) ({steps} steps); refitted "
                       "after each epoch", file=sys.stderr)
        self._plan_epochs(total, steps)
