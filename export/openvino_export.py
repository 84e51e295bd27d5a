"""ONNX -> OpenVINO IR: FP32 weights (`openvino/`), FP16-compressed weights (`openvino_fp16/`).

`ov.save_model` compresses weights to FP16 unless told not to, so the FP32 IR passes
`compress_to_fp16=False` explicitly. Compute precision is a runtime choice (INFERENCE_PRECISION_HINT):
parity pins it to f32 and records it, because CPUs with AVX512-BF16/AMX default to bf16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfineseg.export.context import Built, ExportContext
from dfineseg.export.errors import ExportBackendUnavailable, ExportError
from dfineseg.export.meta import with_precision, write_openvino_metadata
from dfineseg.export.openvino_rewrites import fuse_sampling_bags
from dfineseg.export.publish import ArtefactRecord, artefact_size
from dfineseg.infer.graph import OUTPUT_NAMES, RAW_NAMES

if TYPE_CHECKING:
    from dfineseg.export.formats import Artefact

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
    sampling_bags: int = 0  # deformable-attention samplings rewritten as EmbeddingBagPackedSum


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
    # The deformable attention's gather + weighted sum as OpenVINO's one-node form (export/openvino_rewrites.py).
    bags = fuse_sampling_bags(model)
    write_openvino_metadata(model, metadata)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=compress_fp16)
    return OpenVinoExportInfo(xml=xml, compressed_fp16=compress_fp16, seconds=time.perf_counter() - t0,
                              sampling_bags=bags)


def compile_openvino(model_or_path: Any, precision_hint: str = PARITY_PRECISION_HINT) -> Any:
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(model_or_path)) if isinstance(model_or_path, str | Path) else model_or_path
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision_hint})


def compiled_forward(compiled: Any) -> Any:
    """A `batch -> {output name: array}` function over a compiled model (first known name of each output)."""
    known = (*OUTPUT_NAMES, *RAW_NAMES)
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


def build_ir(ctx: ExportContext, artefact: Artefact) -> Built:
    """format=openvino: the FP32 ONNX converted to an IR folder, FP32 weights or (half=true) FP16-compressed,
    its twin converted alike; checked at f32 compute precision (PARITY_PRECISION_HINT)."""
    key, precision = artefact.key, artefact.precision
    compress = precision == "fp16"
    out_dir = ctx.run.start(key)
    info = export_openvino(ctx.made["onnx"], out_dir, compress_fp16=compress,
                           metadata=with_precision(ctx.metadata, precision))
    ctx.say(f"OpenVINO {precision}: converted ({artefact_size(out_dir) / 1e6:.1f} MB, {info.seconds:.1f} s; "
            f"{info.sampling_bags} deformable-attention sampling(s) as EmbeddingBagPackedSum)")
    record = ArtefactRecord(key, out_dir, precision, info.seconds, extra={"precision_hint": PARITY_PRECISION_HINT,
                                                                        "sampling_bags": info.sampling_bags})
    twin = None
    if ctx.twin is not None:
        raw = export_openvino(ctx.twin, ctx.scratch / f"raw_{key}", compress_fp16=compress, metadata={})
        twin = compiled_forward(compile_openvino(raw.xml, PARITY_PRECISION_HINT))
    # Compiled from the staging folder: the compiled model lives in memory, so renaming the folder
    # afterwards (promotion) does not disturb it.
    return Built(record, info.xml, twin, {"precision": PARITY_PRECISION_HINT})
