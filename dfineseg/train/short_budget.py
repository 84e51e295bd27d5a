"""The short-budget recipe: what `train.time=` chooses for the keys the user left to us.

A few CPU-minutes buy a few hundred optimizer steps. The schema's defaults are D-FINE's, made for 72+ epochs
on COCO from pretrained backbones; in a few hundred steps from scratch they spend the run warming up (500
warm-up steps, capped at a third of the run), averaging early weights into the EMA, learning on mosaics and
affine warps the validation never shows, and matching 300 queries plus 100 denoising queries per image.

With `train.time` at most SHORT_BUDGET_MINUTES and a fresh run (a resume keeps its run's config.yaml, which
already holds these values), each choice below is applied unless its key was given in the config file or on
the command line; the learning rates only when the run starts from random weights (fine-tuning from
`model.weights` / `model.backbone_weights` keeps the official ones), the batch only on a CPU (where a step
costs about as much per image at batch 4 as at 8, so the smaller batch buys twice the steps). The run prints what it chose and writes
it to the run's config.yaml, so a resume continues with the same settings.

Measured on the `--hard` synthetic data and the demo: docs/BENCHMARKS.md, "Short-budget recipe".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A budget of at most this many minutes is "short": a 2-core CPU buys ~40 steps a minute at 320 px.
SHORT_BUDGET_MINUTES = 120.0


@dataclass(frozen=True)
class Choice:
    key: str  # dotted config key, as on the command line
    value: Any
    why: str
    from_scratch_only: bool = False  # only when no starting weights are configured
    cpu_only: bool = False  # only when the run trains on the CPU


RECIPE: tuple[Choice, ...] = (
    Choice("train.warmup_iters", 20, "reach the full learning rate within the first minute"),
    Choice("train.ema_warmup", 50, "the EMA follows the fast-changing early weights"),
    Choice("train.flat_frac", 0.3, "start the cosine decay at 30% (most of a short run's F1 comes in the decay)"),
    Choice("train.lr", 2e-3, "random initial weights learn faster at a higher rate", from_scratch_only=True),
    Choice("train.backbone_lr", 5e-4, "random backbone weights need more than the fine-tuning rate",
           from_scratch_only=True),
    Choice("train.batch", 4, "twice the steps of batch 8 in the same minutes (a CPU step costs ~ its images)",
           cpu_only=True),
    Choice("loss.vfl", 3.0, "classification weight x3: the model finds objects before it scores them"),
    Choice("model.num_queries", 100, "fewer queries to match and score per step"),
    Choice("model.num_denoising", 50, "half the denoising queries per step"),
    Choice("data.augment.mosaic.p", 0.0, "no mosaics: too few steps to profit from them"),
    Choice("data.augment.affine.p", 0.0, "no affine warps: too few steps to profit from them"),
    Choice("data.augment.photometric.p", 0.0, "no colour jitter: too few steps to profit from them"),
)


def is_set(cfg: Any, key: str) -> bool:
    """True if `key` (dotted) was given in the config file or overrides, not left at the schema default."""
    node = cfg
    for name in key.split("."):
        if name not in getattr(node, "model_fields_set", ()):
            return False
        node = getattr(node, name)
    return True


def _assign(cfg: Any, key: str, value: Any) -> None:
    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)  # validated (Section has validate_assignment)


def applies(cfg: Any, resuming: bool) -> bool:
    time = cfg.train.time
    return bool(time) and time <= SHORT_BUDGET_MINUTES and not resuming


def apply_short_budget(cfg: Any, resuming: bool = False, on_cpu: bool = True) -> tuple[Any, list[Choice]]:
    """(config to train with, the choices made). The caller's config object is never changed: a copy is."""
    if not applies(cfg, resuming):
        return cfg, []
    from_scratch = not (cfg.model.weights or cfg.model.backbone_weights)
    chosen = [c for c in RECIPE if not is_set(cfg, c.key) and (from_scratch or not c.from_scratch_only)
              and (on_cpu or not c.cpu_only)]
    if not chosen:
        return cfg, []
    cfg = cfg.model_copy(deep=True)
    for choice in chosen:
        _assign(cfg, choice.key, choice.value)
    return cfg, chosen


def describe(choices: list[Choice], minutes: float) -> str:
    lines = [f"short-budget recipe (train.time={minutes:g} min; set any of these keys to keep your own value):"]
    lines += [f"  {c.key}={c.value:g}  ({c.why})" if isinstance(c.value, float) else f"  {c.key}={c.value}  ({c.why})"
              for c in choices]
    return "\n".join(lines)
