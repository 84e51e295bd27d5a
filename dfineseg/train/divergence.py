"""The divergence guard: counts skipped (non-finite) optimizer steps and stops a run that is no longer
training, with a message that says what to change and which checkpoints are kept."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfineseg.infer.errors import UserError
from dfineseg.train.optim import resolve_optim_settings


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite losses or gradients; the last checkpoint with finite weights is kept."""


# The divergence guard: a run stops when this share of the last NONFINITE_WINDOW steps was skipped, or when
# most of its steps so far were (at least two), or after train.max_nonfinite skipped steps in a row.
NONFINITE_WINDOW = 20
NONFINITE_WINDOW_SHARE = 0.5


class DivergenceGuard:
    """Skipped-step counters of one run: `total` (stored in checkpoints as nonfinite_steps and restored on
    resume), `run` (in a row) and `recent` (the last NONFINITE_WINDOW steps, True = skipped).
    `describe(reason)` turns a stop reason into the full message of the TrainingDiverged raised."""

    def __init__(self, max_nonfinite: int, describe: Callable[[str], str], is_main: bool = True) -> None:
        self.max_nonfinite = max_nonfinite
        self.describe = describe
        self.is_main = is_main
        self.total = 0
        self.run = 0
        self.recent: deque[bool] = deque(maxlen=NONFINITE_WINDOW)

    def skipped(self, what: str, step: int, epoch: int) -> None:
        """A skipped step (non-finite `what`: loss or gradient) at optimizer step `step` of the 0-based
        `epoch`. Stops the run when skips are no longer rare: in a row (train.max_nonfinite), most steps so
        far, or half of the recent ones. A run that skips most steps is not training, and the few steps that
        do pass push the weights further out."""
        self.total += 1
        self.run += 1
        self.recent.append(True)
        if self.is_main:
            print(f"warning: non-finite {what} at step {step} (epoch {epoch + 1}); step skipped "
                  f"({self.run} in a row, {self.total} in total)", file=sys.stderr)
        attempts = step + self.total
        recent = sum(self.recent)
        reason = ""
        if self.run >= self.max_nonfinite:
            reason = f"{self.run} consecutive non-finite losses or gradients"
        elif self.total >= 2 and self.total > step:
            reason = f"{self.total} of the {attempts} steps so far had non-finite losses or gradients"
        elif recent >= NONFINITE_WINDOW * NONFINITE_WINDOW_SHARE:
            reason = (f"{recent} of the last {len(self.recent)} steps had non-finite losses or "
                      "gradients")
        if reason:
            raise TrainingDiverged(self.describe(reason))

    def finite_step(self) -> None:
        """An optimizer step that was taken: the run of skips is broken."""
        self.run = 0
        self.recent.append(False)


def diverged_message(reason: str, *, tcfg: Any, size: str, step: int, epoch: int, epoch_batch: int,
                     run_dir: Path, saved_checkpoints: dict[str, int]) -> str:
    """Why the run stopped at `step` (`epoch` and `epoch_batch`: the trainer's 0-based counters), the
    learning rate to lower (`tcfg`: the train section, `size`: model.size), and the checkpoints kept
    (`saved_checkpoints`: name -> step of this run's files in `run_dir`)."""
    lr = resolve_optim_settings(tcfg, size).lr
    default = resolve_optim_settings(tcfg.model_copy(update={"lr": None}), size).lr
    if tcfg.lr is None:
        advice = f"train.lr={lr:g} (the default for size={size}); lower it (e.g. lr={lr / 10:g})"
    else:
        advice = f"train.lr={lr:g}; lower it (size={size} defaults to {default:g}; try lr={min(lr / 10, default):g})"
    # At an epoch boundary the counter has already moved on to the next epoch.
    epoch = epoch if epoch_batch == 0 and epoch > 0 else epoch + 1
    if saved_checkpoints:
        kept = ", ".join(str(run_dir / n) for n in sorted(saved_checkpoints, key=lambda n: n != "last.pt"))
        at = max(saved_checkpoints.values())
        kept = f"The last checkpoints with finite weights are kept: {kept} (up to step {at})."
    else:
        kept = ("No checkpoint was written: the run diverged before its first save, so there is nothing to "
                "resume from.")
    return (
        f"training diverged at step {step} (epoch {epoch}): {reason}. The learning rate is most "
        f"likely too high: {advice} and train again. Keep "
        "gradient clipping on (train.clip_grad) and check the dataset for degenerate boxes (dfineseg data "
        f"check) if a lower lr does not help. {kept}"
    )
