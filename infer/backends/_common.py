"""Small helpers the backends share: device strings, the network input size, the stored precision."""

from __future__ import annotations

import json
import re
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


# ONNX Runtime prefixes its messages with a status code and names the C++ function that failed; OpenVINO
# stacks "Exception from src/...cpp:84:" lines above the reason. Both hide the reason a user needs.
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_CPP_FRAME = re.compile(
    r"[\w./\\-]+\.(?:cc|cpp|cxx|c|h|hpp):\d+:?\s+(?:[^\s(]+\s+){0,3}?[\w:~<>]+\((?:[^()]|\([^()]*\))*\)\s*"
)
_OV_FRAME = re.compile(r"^(?:Exception from \S+:\d+:?|Check '.*' failed at \S+:\d+:?)\s*$")


def runtime_message(exc: BaseException, max_chars: int = 1200) -> str:
    """The runtime's own reason for an error, whole: status prefixes and C++ source locations removed,
    the remaining lines joined (cut only past `max_chars`)."""
    text = _ORT_STATUS.sub("", str(exc))
    text = _CPP_FRAME.sub(" ", text)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not _OV_FRAME.match(line)]
    message = " ".join(lines) or type(exc).__name__
    message = re.sub(r"failed:\s*", "failed: ", message)
    return message if len(message) <= max_chars else message[: max_chars - 3] + "..."


def onnx_load_hint(message: str, runtime: str, version: str) -> str:
    """What to do about a file this runtime cannot load, from its message."""
    ir = re.search(r"IR version:?\s*(\d+),\s*max supported IR version:?\s*(\d+)", message)
    if ir:
        return (
            f"the file is ONNX IR version {ir.group(1)}, this {runtime} {version} reads up to {ir.group(2)}: "
            f"upgrade it (pip install -U {runtime}) or export the model again with this environment's "
            "onnx (`dfineseg export`)"
        )
    if re.search(r"[Oo]pset \d+", message):
        return (
            f"the file uses an operator set this {runtime} {version} does not support: upgrade it "
            f"(pip install -U {runtime}) or export again with a lower export.opset"
        )
    return "is it a complete, uncorrupted export? Export it again with `dfineseg export`"
