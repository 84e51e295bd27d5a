"""Matching and losses: `build_criterion(loss_cfg, num_classes, task)` -> a callable
`criterion(outputs, targets) -> dict` of weighted `loss_*` terms (+ the `num_sanitized` counter).

Modules: terms.py (the one table of loss names, config keys and default weights; no torch), functions.py
(each term's maths), criterion.py (matching and assembly), fdr.py (the FDR bins, shared with the decoder),
matcher.py, mask_points.py, denoising.py, box_ops.py.

The names below are imported on first use, so `import dfineseg.loss.terms` (which the torch-free config
schema does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DFINESegCriterion": "dfineseg.loss.criterion",
    "aggregate_losses": "dfineseg.loss.criterion",
    "build_criterion": "dfineseg.loss.criterion",
    "total_loss": "dfineseg.loss.criterion",
    "HungarianMatcher": "dfineseg.loss.matcher",
    "downsample_masks": "dfineseg.loss.matcher",
    "union_of_matches": "dfineseg.loss.matcher",
    "LOSS_WEIGHTS": "dfineseg.loss.terms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dfineseg.loss' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
