"""dfineseg: train, export, run and benchmark D-FINE-seg.

This module imports nothing heavy (no torch, no pydantic): `dfineseg.infer` must stay usable on an edge
device.

Python API: `dfineseg.train(cfg)`, `dfineseg.val(cfg)`, `dfineseg.export(cfg)`, `dfineseg.bench(cfg)` and
`dfineseg.Predictor(path)`. `train`, `val` and `export` are also the names of subpackages (the design
card's layout), so those modules are made callable (`dfineseg/_callable.py`) and imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_CALLABLE_MODULES = {"train": "dfineseg.train", "val": "dfineseg.val", "export": "dfineseg.export"}


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return importlib.import_module(_CALLABLE_MODULES[name])
    raise AttributeError(f"module 'dfineseg' has no attribute {name!r}")


def bench(cfg: Any = None, **overrides: Any) -> Any:
    """Benchmark every format under the paper's protocol; returns the results rows."""
    from dfineseg.api import bench as _bench

    return _bench(cfg, **overrides)


def Predictor(*args: Any, **kwargs: Any) -> Any:  # noqa: N802  (reads like the class it returns)
    """Shortcut for `dfineseg.infer.predictor.Predictor.load(path, ...)`."""
    from dfineseg.infer.predictor import Predictor as _Predictor

    return _Predictor.load(*args, **kwargs)
