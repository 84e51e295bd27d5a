"""ONNX -> OpenVINO IR: FP32 weights (`openvino/`), FP16-compressed weights (`openvino_fp16/`).

`ov.save_model` compresses weights to FP16 unless told not to, so the FP32 IR passes
`compress_to_fp16=False` explicitly. Compute precision is a runtime choice (INFERENCE_PRECISION_HINT):
parity pins it to f32 and records it, because CPUs with AVX512-BF16/AMX default to bf16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.export.errors import ExportBackendUnavailable, ExportError
from dfineseg.export.meta import write_openvino_metadata

PARITY_PRECISION_HINT = "f32"


def import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportBackendUnavailable(
            f'OpenVINO export needs the openvino package: pip install "dfineseg[openvino]" ({exc})'
        ) from None
    return ov


@dataclass
class OpenVinoExportInfo:
    xml: Path
    compressed_fp16: bool
    seconds: float


def export_openvino(onnx_path: Path, out_dir: Path, *, compress_fp16: bool, metadata: dict[str, str]) -> OpenVinoExportInfo:
    """Convert `onnx_path` into `out_dir/model.xml` (+ .bin) with the dfineseg metadata in rt_info."""
    ov = import_openvino()
    t0 = time.perf_counter()
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        from dfineseg.infer.backends._common import runtime_message

        raise ExportError(
            f"{onnx_path}: OpenVINO {getattr(ov, '__version__', '')} could not convert the ONNX graph: "
            f"{runtime_message(exc)}"
        ) from exc
    write_openvino_metadata(model, metadata)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=compress_fp16)
    return OpenVinoExportInfo(xml=xml, compressed_fp16=compress_fp16, seconds=time.perf_counter() - t0)


def compile_openvino(model_or_path: Any, precision_hint: str = PARITY_PRECISION_HINT) -> Any:
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(model_or_path)) if isinstance(model_or_path, str | Path) else model_or_path
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision_hint})


def compiled_forward(compiled: Any) -> Any:
    """A `batch -> {output name: array}` function over a compiled model (first known name of each output)."""
    known = ("scores", "labels", "boxes", "mask_logits", "logits", "boxes_cxcywh")
    names = []
    for out in compiled.outputs:
        tensor_names = out.get_names()
        hits = [n for n in known if n in tensor_names]
        names.append(hits[0] if hits else out.get_any_name())
    request = compiled.create_infer_request()

    def forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return {n: np.array(request.get_output_tensor(i).data) for i, n in enumerate(names)}

    return forward


def compiled_precision(compiled: Any) -> str:
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
