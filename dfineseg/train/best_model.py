"""Which validated epoch best.pt keeps, and why.

Epochs are compared on `train.best_metric`, then on metrics that still move when it does not: the threshold
sweep's best F1 (`best_f1`), then mask mAP50-95 (box mAP50-95 for detect). The primary metric alone ties
too often: mask F1 at conf 0.5 stays 0 while a young model's scores are all under 0.5 (measured: 8 epochs,
mAP 0 -> 0.015 and best F1 0.0003 -> 0.089, yet epoch 1 was kept because every epoch scored 0). The
comparison is lexicographic on a tuple of floats; a missing or NaN metric counts as -inf (never better).

The tuple is stored in checkpoints (`best_key`) with the history of validated epochs (`fitness_history`),
so a resumed run compares exactly as an uninterrupted one; an older checkpoint holds only the float
`best_fitness`, read as that value with unknown (-inf) tie-breakers.
"""

from __future__ import annotations

import math
from typing import Any

_WORST = float("-inf")


def ranking_metrics(best_metric: str, task: str) -> tuple[str, ...]:
    """The metric names compared, in order: the primary metric first, each name once."""
    mean_ap = "box_map50_95" if task == "detect" else "mask_map50_95"
    names: list[str] = []
    for name in (best_metric, "best_f1", mean_ap):
        if name not in names:
            names.append(name)
    return tuple(names)


def _value(metrics: dict[str, float], name: str) -> float:
    value = metrics.get(name)
    if not isinstance(value, int | float) or math.isnan(value):
        return _WORST
    return float(value)


def fitness_key(metrics: dict[str, float], names: tuple[str, ...]) -> tuple[float, ...]:
    """The tuple an epoch is ranked by (greater is better)."""
    return tuple(_value(metrics, name) for name in names)


def key_from_checkpoint(ckpt: dict[str, Any], names: tuple[str, ...]) -> tuple[float, ...] | None:
    """The stored best tuple; from an older checkpoint (a float `best_fitness` only) that value with -inf
    tie-breakers, so any later epoch that ties on the primary metric and has measured tie-breakers wins
    (the old rule kept the first of the tied epochs, which is what this rule fixes)."""
    key = ckpt.get("best_key")
    if isinstance(key, list | tuple) and key:
        stored = [float(v) for v in key]
        return tuple(stored[: len(names)] + [_WORST] * (len(names) - len(stored)))
    fitness = ckpt.get("best_fitness")
    if isinstance(fitness, int | float):
        return (float(fitness),) + (_WORST,) * (len(names) - 1)
    return None


def _shown(value: float) -> str:
    return "n/a" if value == _WORST else f"{value:.4f}"


def explain_best(best_epoch: int, best: tuple[float, ...] | None, history: list[tuple[int, tuple[float, ...]]],
                 names: tuple[str, ...], total_epochs: int) -> str:
    """One line: which epoch best.pt holds and the comparison that chose it (epochs 0-based in, 1-based out)."""
    if best is None or best_epoch < 0:
        return "best.pt holds the last weights: no epoch was validated"
    values = ", ".join(f"{n} {_shown(v)}" for n, v in zip(names, best))
    head = f"best.pt holds epoch {best_epoch + 1} of {total_epochs} ({values})"
    others = [key for epoch, key in history if epoch != best_epoch]
    if not others:
        return f"{head}: the only validated epoch"
    for level in range(len(best)):
        tied = [key for key in others if key[: level + 1] == best[: level + 1]]
        if not tied:
            if level == 0:
                return f"{head}: the highest {names[0]} of {len(others) + 1} validated epochs"
            return f"{head}: {len(others)} other epoch(s) tied on {', '.join(names[:level])}; {names[level]} decided"
        others = tied
    return f"{head}: {len(others)} other epoch(s) tied on every compared metric; the earliest is kept"
