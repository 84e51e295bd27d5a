"""Checkpoint files: plain tensors and plain values, atomic writes, clear errors, a migration path.

`torch.load(path, weights_only=True)` reads every file written here (no pickled classes), so loading a
checkpoint from somewhere else cannot run code. RNG states are stored as tensors and lists for the same
reason (`dfineseg.train.rng_state`). Layout (docs/ARCHITECTURE.md section 6): schema_version,
dfineseg_version, config, names, category_ids, model, ema, ema_updates, optimizer, scheduler, scaler, epoch,
step, rng, metrics, best_fitness (+ best_key, fitness_history: how best.pt was chosen), plus trainer
bookkeeping (epoch_step, nonfinite_steps, elapsed_s, total_epochs, and the time budget's measurements
val_s, write_s, step_s, validated_step). Files without the newer keys still load.
"""

from __future__ import annotations

import copy
import errno
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dfineseg.infer.errors import UserError
from dfineseg.utils.io import atomic_torch_save

CHECKPOINT_SCHEMA = 1
_REQUIRED = ("schema_version", "config", "names", "model")


class CheckpointError(UserError, ValueError):
    """A file that is missing, truncated, not a dfineseg checkpoint, or from a newer dfineseg."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, permissions); the previous file is intact."""


# Size-dependent caches (decoder anchors hold +inf at invalid positions by design): neither real weights
# nor rebuilt from the file.
CACHE_SUFFIXES = ("anchors", "valid_mask")


# version -> function upgrading a checkpoint dict of that version to version + 1. Version 1 is the
# first; when the layout changes, bump CHECKPOINT_SCHEMA and register the old version's upgrade here.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(ckpt: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    version = int(ckpt.get("schema_version", 0))
    if version > CHECKPOINT_SCHEMA:
        raise CheckpointError(
            f"{source}: checkpoint schema {version} is newer than this dfineseg supports ({CHECKPOINT_SCHEMA}); "
            "upgrade dfineseg to read it"
        )
    while version < CHECKPOINT_SCHEMA:
        upgrade = MIGRATIONS.get(version)
        if upgrade is None:
            raise CheckpointError(f"{source}: no migration from checkpoint schema {version} to {CHECKPOINT_SCHEMA}")
        ckpt = upgrade(ckpt)
        version += 1
        ckpt["schema_version"] = version
    return ckpt


# ---------------------------------------------------------------- writing and reading
def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def nonfinite_weights(state: dict[str, Any] | None) -> list[str]:
    """Names of floating tensors in a state dict holding NaN or inf (caches like the anchors excepted)."""
    bad = []
    for name, value in (state or {}).items():
        if (isinstance(value, torch.Tensor) and value.is_floating_point() and not name.endswith(CACHE_SUFFIXES)
                and not bool(torch.isfinite(value).all())):
            bad.append(name)
    return bad


def _write_failure(exc: BaseException) -> str:
    """Why a write failed, in words; torch buries the OS reason inside its own message, or drops it."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return "No space left on device"
    for e in chain:
        if isinstance(e, OSError) and e.errno == getattr(errno, "EDQUOT", None):
            return "disk quota exceeded"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    text = " ".join(str(exc).split())
    if "PytorchStreamWriter failed" in text or "file write failed" in text:
        # torch reports only that the write failed; a full disk is by far the most common cause.
        return "the write failed (most likely No space left on device)"
    return text[:300] or type(exc).__name__


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Atomic: a kill at any moment leaves the previous file or the new one, never a torn file.

    A failed write (disk full, permissions) raises `CheckpointWriteError` naming the file, the reason and
    the fix; the temp file is removed and the previous checkpoint at `path` is untouched.
    """
    from dfineseg import __version__

    path = Path(path)
    out = dict(ckpt)
    out.setdefault("schema_version", CHECKPOINT_SCHEMA)
    out.setdefault("dfineseg_version", __version__)
    out = _to_cpu(out)
    try:
        atomic_torch_save(out, path)
    except (OSError, RuntimeError) as exc:
        kept = f"the previous {path.name} is kept intact" if path.is_file() else f"no earlier {path.name} existed"
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {_write_failure(exc)}. Nothing was replaced ({kept}: checkpoints "
            f"are written to a temporary file first). Free space on the disk holding {path.parent} (or train "
            "into another folder with project=...), then continue with resume= pointing at the last.pt kept"
        ) from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: not a dfineseg checkpoint (it holds pickled Python objects: {str(exc).splitlines()[0]}). "
            "An official D-FINE .pth goes in model.weights=, not in resume= or weights= of val/export"
        ) from None
    except Exception as exc:  # noqa: BLE001  (any decoding failure of a foreign file; reported, not swallowed)
        raise CheckpointError(
            f"{path}: not a readable checkpoint: truncated, or another kind of file ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]}); use another copy (last.pt and best.pt are written "
            "atomically, so a kill leaves one intact)"
        ) from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in _REQUIRED):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a dfineseg checkpoint (found {keys}, expected keys {list(_REQUIRED)}). "
            "An official D-FINE .pth goes in model.weights="
        )
    return migrate(ckpt, str(path))


def config_from_checkpoint(ckpt: dict[str, Any]) -> Any:
    """The run's resolved Config, with paths that only existed on the training machine dropped."""
    from dfineseg.config import build_config

    raw = copy.deepcopy(ckpt["config"])
    data = raw.setdefault("data", {})
    if data.get("path") and not Path(data["path"]).expanduser().exists():
        data["path"] = None
    model = raw.setdefault("model", {})
    # The weights are in the checkpoint itself; never reload the starting weights.
    model["weights"] = None
    model["backbone_weights"] = None
    train = raw.setdefault("train", {})
    train["resume"] = None
    return build_config(raw, "checkpoint config")
