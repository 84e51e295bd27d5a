"""The metadata map stored inside every exported model (ONNX metadata_props, OpenVINO rt_info, a JSON
sidecar for TensorRT engines): a flat str -> str map, so every container can hold it unchanged.

Keys (docs/ARCHITECTURE.md section 4): ``dfineseg_schema`` ("2"), ``dfineseg_version``, ``task``,
``names`` (JSON list), ``category_ids`` (JSON list), ``imgsz`` (JSON [H, W]), ``resize``
("stretch" | "letterbox"), ``conf``, ``topk``, ``precision``. Plain strings are stored as they are;
every other value is JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dfineseg.infer.errors import UserError

# 2: segment graphs output mask features + per-detection embeddings instead of mask logits
# (dfineseg.infer.graph); schema-1 files still load. A dfineseg that reads only schema 1 refuses schema-2
# files with "upgrade dfineseg" instead of failing on the missing mask_logits output.
SCHEMA_VERSION = 2
TASKS = ("segment", "detect")
RESIZE_MODES = ("stretch", "letterbox")
REQUIRED_KEYS = ("dfineseg_schema", "task", "names", "imgsz", "resize")


class MetadataError(UserError, ValueError):
    """The model file's metadata is missing, malformed or from a newer dfineseg."""


@dataclass(frozen=True)
class ModelInfo:
    names: list[str]
    category_ids: list[int]
    imgsz: tuple[int, int]
    resize: str = "stretch"
    conf: float = 0.5
    topk: int = 100
    task: str = "segment"
    precision: str = "fp32"
    schema: int = SCHEMA_VERSION
    version: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_metadata(self) -> dict[str, str]:
        return encode_metadata(
            {
                "dfineseg_schema": self.schema,
                "dfineseg_version": self.version,
                "task": self.task,
                "names": self.names,
                "category_ids": self.category_ids,
                "imgsz": list(self.imgsz),
                "resize": self.resize,
                "conf": self.conf,
                "topk": self.topk,
                "precision": self.precision,
            }
        )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("dfineseg")
    except Exception:  # not installed (running from a source tree): the version is informative only
        return "unknown"


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Values -> the flat str -> str map. Fills ``dfineseg_schema`` and ``dfineseg_version`` when absent."""
    merged = {"dfineseg_schema": SCHEMA_VERSION, "dfineseg_version": _package_version(), **dict(values)}
    if not merged.get("dfineseg_version"):
        merged["dfineseg_version"] = _package_version()
    out = {}
    for key, value in merged.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _json(meta: Mapping[str, str], key: str, source: str) -> Any:
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as exc:
        raise MetadataError(f"{source}: metadata key {key!r} is not valid JSON ({meta[key]!r}): {exc}") from None


def decode_metadata(meta: Mapping[str, str], source: str = "model file") -> ModelInfo:
    """The flat map -> `ModelInfo`, refusing files from a newer schema and naming the bad key otherwise."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise MetadataError(
            f"{source}: not a dfineseg model or written without metadata (missing keys {missing}); "
            "re-export it with `dfineseg export`"
        )
    try:
        schema = int(meta["dfineseg_schema"])
    except ValueError:
        raise MetadataError(f"{source}: dfineseg_schema must be an integer, got {meta['dfineseg_schema']!r}") from None
    if schema > SCHEMA_VERSION:
        raise MetadataError(
            f"{source} was written by a newer dfineseg (metadata schema {schema}, version "
            f"{meta.get('dfineseg_version', '?')}); this dfineseg ({_package_version()}) reads schema "
            f"<= {SCHEMA_VERSION}: upgrade dfineseg (pip install -U dfineseg)"
        )
    task = meta["task"]
    if task not in TASKS:
        raise MetadataError(f"{source}: metadata key 'task' must be one of {TASKS}, got {task!r}")
    resize = meta["resize"]
    if resize not in RESIZE_MODES:
        raise MetadataError(f"{source}: metadata key 'resize' must be one of {RESIZE_MODES}, got {resize!r}")
    names = _json(meta, "names", source)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise MetadataError(f"{source}: metadata key 'names' must be a non-empty JSON list of strings")
    if "category_ids" in meta:
        category_ids = _json(meta, "category_ids", source)
        if not isinstance(category_ids, list) or len(category_ids) != len(names) or not all(
            isinstance(c, int) for c in category_ids
        ):
            raise MetadataError(f"{source}: metadata key 'category_ids' must be a JSON list of {len(names)} integers")
    else:
        category_ids = list(range(len(names)))
    imgsz = _json(meta, "imgsz", source)
    if not (isinstance(imgsz, list) and len(imgsz) == 2 and all(isinstance(v, int) and v > 0 for v in imgsz)):
        raise MetadataError(f"{source}: metadata key 'imgsz' must be a JSON [H, W] of positive integers, got {meta['imgsz']!r}")
    try:
        conf = float(meta.get("conf", "0.5"))
        topk = int(meta.get("topk", "100"))
    except ValueError as exc:
        raise MetadataError(f"{source}: metadata 'conf'/'topk' malformed: {exc}") from None
    return ModelInfo(
        names=names,
        category_ids=category_ids,
        imgsz=(imgsz[0], imgsz[1]),
        resize=resize,
        conf=conf,
        topk=topk,
        task=task,
        precision=meta.get("precision", "fp32"),
        schema=schema,
        version=meta.get("dfineseg_version", ""),
    )
