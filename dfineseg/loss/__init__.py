"""Matching and losses: `build_criterion(loss_cfg, num_classes, task)` -> a callable
`criterion(outputs, targets) -> dict` of weighted `loss_*` terms (+ the `num_sanitized` counter)."""

from dfineseg.loss.criterion import (
    LOSS_NAMES,
    DFINESegCriterion,
    SetCriterion,
    aggregate_losses,
    build_criterion,
    total_loss,
)
from dfineseg.loss.matcher import HungarianMatcher, downsample_masks, union_of_matches

__all__ = [
    "LOSS_NAMES",
    "DFINESegCriterion",
    "HungarianMatcher",
    "SetCriterion",
    "aggregate_losses",
    "build_criterion",
    "downsample_masks",
    "total_loss",
    "union_of_matches",
]
