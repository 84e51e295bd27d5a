"""Where the metadata goes inside each exported file (ARCHITECTURE.md section 4).

The map itself is `ModelInfo.to_metadata()` (`dfineseg.infer.metadata`, the module every backend
decodes it with); this module only puts it where each backend looks: ONNX metadata_props, the OpenVINO
rt_info section "model_info", a JSON sidecar next to a TensorRT engine.
"""

from __future__ import annotations

import json
from typing import Any


def with_precision(metadata: dict[str, str], precision: str) -> dict[str, str]:
    """The same map for an artefact computing in another precision (fp16, int8)."""
    return {**metadata, "precision": precision}


def write_onnx_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Store `metadata` in an onnx.ModelProto's metadata_props (replacing earlier values)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def write_openvino_metadata(model: Any, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        model.set_rt_info(value, ["model_info", key])


def write_sidecar(path: Any, metadata: dict[str, str]) -> None:
    from dfineseg.utils.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(metadata, indent=2).encode())
