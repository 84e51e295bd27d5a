"""dfineseg: train, export, run and benchmark D-FINE-seg.

This module imports nothing heavy (no torch, no pydantic): `dfineseg.infer` must stay usable on an edge
device.

Python API: the functions of `dfineseg.api` (`api.train(cfg)`, `api.val(cfg)`, `api.export(cfg)`,
`api.bench(cfg)`), plus the shortcuts `dfineseg.Predictor(path)` and `dfineseg.bench(cfg)`. `dfineseg.train`,
`dfineseg.val` and `dfineseg.export` are the subpackages of the design card's layout, not functions.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# PyTorch's OpenMP threads spin for a while before they sleep. On a small CPU shared with anything else that
# spinning fights the other process for the cores: one busy process next to a 2-thread training step made it
# 10-25x slower (17-40 s against 1.6 s), while 5000 spins keep the idle speed at 320 px (1.6-1.7 s), cost 6%
# at 128 px, and 2.4x under that load (docs/BENCHMARKS.md, "OpenMP wait policy"). libgomp reads it when torch
# loads, so it only applies when dfineseg is imported before torch (the CLI always is); a user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "5000")


def bench(cfg: Any = None, **overrides: Any) -> Any:
    """Benchmark every format under the paper's protocol; returns the results rows."""
    from dfineseg.api import bench as _bench

    return _bench(cfg, **overrides)


def Predictor(*args: Any, **kwargs: Any) -> Any:  # noqa: N802  (reads like the class it returns)
    """Shortcut for `dfineseg.infer.predictor.Predictor.load(path, ...)`."""
    from dfineseg.infer.predictor import Predictor as _Predictor

    return _Predictor.load(*args, **kwargs)
