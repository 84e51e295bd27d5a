"""The metadata stored inside every exported file (ARCHITECTURE.md section 4).

Values are encoded by `dfineseg.infer.metadata` (the module every backend decodes them with); this
module assembles them and puts the map where each backend looks: ONNX metadata_props, the OpenVINO
rt_info section "model_info", a JSON sidecar next to a TensorRT engine.
"""

from __future__ import annotations

import json
from typing import Any

from dfineseg.infer.metadata import encode_metadata


def build_metadata(
    *,
    task: str,
    names: list[str],
    category_ids: list[int] | None,
    imgsz: tuple[int, int],
    resize: str,
    conf: float,
    topk: int,
    precision: str,
) -> dict[str, str]:
    """The flat str->str map (encoded by `dfineseg.infer.metadata`, the same module that reads it)."""
    cat_ids = list(category_ids) if category_ids is not None else list(range(len(names)))
    return encode_metadata(
        {
            "task": task,
            "names": list(names),
            "category_ids": [int(c) for c in cat_ids],
            "imgsz": [int(imgsz[0]), int(imgsz[1])],
            "resize": resize,
            "conf": float(conf),
            "topk": int(topk),
            "precision": precision,
        }
    )


def with_precision(metadata: dict[str, str], precision: str) -> dict[str, str]:
    return {**metadata, "precision": precision}


def write_onnx_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Store `metadata` in an onnx.ModelProto's metadata_props (replacing earlier values)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def write_openvino_metadata(model: Any, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        model.set_rt_info(value, ["model_info", key])


def write_sidecar(path: Any, metadata: dict[str, str]) -> None:
    from dfineseg.utils.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(metadata, indent=2).encode())
