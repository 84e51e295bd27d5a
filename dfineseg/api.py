"""The Python API, also the CLI's entry points: `train(cfg) -> best.pt`, `val(cfg) -> metrics`,
`export(cfg) -> {artefact: path}`, `bench(cfg) -> rows` (`from dfineseg import api; api.train(cfg)`).

Each takes a validated `Config`, a YAML path, a plain dict, or nothing, plus keyword overrides with the
CLI's short names or dotted paths (`train(data="d.yaml", epochs=3, **{"model.size": "tiny"})`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _resolve(cfg: Any, overrides: dict[str, Any], aliases: dict[str, str]) -> Any:
    from dfineseg.config import Config, build_config, load_config
    from dfineseg.overrides import deep_merge, set_path

    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        set_path(nested, aliases.get(key, key), value)
    if cfg is None or isinstance(cfg, str | Path):
        return load_config(cfg, nested or None, aliases=aliases)
    if isinstance(cfg, Config):
        return build_config(deep_merge(cfg.to_dict(), nested), "config", aliases) if nested else cfg
    if isinstance(cfg, dict):
        return build_config(deep_merge(cfg, nested), "config", aliases)
    raise TypeError(f"cfg must be a Config, a YAML path, a dict or None, got {type(cfg).__name__}")


def train(cfg: Any = None, **overrides: Any) -> Path:
    """Train (or resume, with resume=runs/x/last.pt); returns the run's best.pt."""
    from dfineseg.config import TRAIN_ALIASES
    from dfineseg.train.trainer import Trainer

    return Trainer(_resolve(cfg, overrides, TRAIN_ALIASES)).fit()


def val(cfg: Any = None, *, predict: Any = None, **overrides: Any) -> dict[str, Any]:
    """Score weights=... (a checkpoint, or an exported model via the Predictor) on data=...; returns metrics.

    `predict` may be any callable `images -> list[Detections]` (the hook exported backends use).
    """
    from dfineseg.config import VAL_ALIASES
    from dfineseg.val import run_val

    resolved = _resolve(cfg, overrides, VAL_ALIASES)
    return run_val(resolved, predict=predict)


def export(cfg: Any = None, **overrides: Any) -> dict[str, Path]:
    """Export weights=... to ONNX / OpenVINO / TensorRT (parity-checked); returns {artefact: path}."""
    from dfineseg.config import EXPORT_ALIASES
    from dfineseg.export.api import export as _export

    return _export(_resolve(cfg, overrides, EXPORT_ALIASES))


def bench(cfg: Any = None, **overrides: Any) -> list[dict[str, Any]]:
    """Latency and accuracy of every format under the paper's protocol; returns the results rows."""
    from dfineseg.benchmarks.harness import run_bench
    from dfineseg.config import BENCH_ALIASES

    return run_bench(_resolve(cfg, overrides, BENCH_ALIASES))
