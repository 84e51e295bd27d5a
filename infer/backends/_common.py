"""Small helpers the backends share: device strings, the network input size, the stored precision."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfineseg.infer.backends import ModelFileError, PredictorError


def parse_device(device: str | int | None, allowed: Sequence[str]) -> tuple[str, int | None]:
    """`"cpu"`, `"cuda"`, `"cuda:1"`, `0` (-> cuda:0), `"GPU.1"` -> (kind, index or None)."""
    if device is None:
        return "cpu", None
    if isinstance(device, int):
        kind, index = "cuda", device
    else:
        text = str(device).strip()
        kind, _, idx = text.replace(".", ":").partition(":")
        kind = kind.lower()
        if kind.isdigit():
            kind, idx = "cuda", kind
        try:
            index = int(idx) if idx else None
        except ValueError:
            raise PredictorError(f"device '{device}': the part after ':' must be a number, e.g. cuda:0") from None
    if kind not in allowed:
        raise PredictorError(f"device '{device}' is not one of {', '.join(allowed)} for this backend")
    return kind, index


def metadata_imgsz(metadata: dict[str, str]) -> tuple[int, int] | None:
    raw = metadata.get("imgsz")
    if raw is None:
        return None
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
        if isinstance(value, int):
            return (value, value)
        return (int(value[0]), int(value[1]))
    except (ValueError, TypeError, IndexError):
        return None


def input_hw_from(shape: Sequence[Any], metadata: dict[str, str], path: Path) -> tuple[int, int]:
    """The network input (H, W): the graph's static sizes, else the `imgsz` stored at export."""
    if len(shape) != 4:
        raise ModelFileError(f"{path}: input 'images' has rank {len(shape)}, expected [B,3,H,W]")
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return (h, w)
    stored = metadata_imgsz(metadata)
    if stored is None:
        raise ModelFileError(f"{path}: the input size is dynamic and no 'imgsz' is stored in the model metadata")
    return stored


def precision_from_metadata(metadata: dict[str, str], default: str) -> str:
    value = metadata.get("precision")
    return str(value) if value else default
