"""dfineseg: train, export, run and benchmark D-FINE-seg.

This module imports nothing heavy (no torch, no pydantic): `dfineseg.infer` must stay usable on an edge
device.

Python API: the functions of `dfineseg.api` (`api.train(cfg)`, `api.val(cfg)`, `api.export(cfg)`,
`api.bench(cfg)`), plus the shortcuts `dfineseg.Predictor(path)` and `dfineseg.bench(cfg)`. `dfineseg.train`,
`dfineseg.val` and `dfineseg.export` are the subpackages of the design card's layout, not functions.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def bench(cfg: Any = None, **overrides: Any) -> Any:
    """Benchmark every format under the paper's protocol; returns the results rows."""
    from dfineseg.api import bench as _bench

    return _bench(cfg, **overrides)


def Predictor(*args: Any, **kwargs: Any) -> Any:  # noqa: N802  (reads like the class it returns)
    """Shortcut for `dfineseg.infer.predictor.Predictor.load(path, ...)`."""
    from dfineseg.infer.predictor import Predictor as _Predictor

    return _Predictor.load(*args, **kwargs)
