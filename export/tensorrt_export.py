"""ONNX -> TensorRT FP16 engine (`model.engine` + `model.engine.json` metadata sidecar).

Written against the TensorRT 10 and 11 Python APIs; NOT yet verified on GPU hardware (no GPU where it
was written). The two versions differ in how FP16 is asked for:

- TensorRT 11 builds strongly typed networks only (the FP16 builder flag is gone): the network is
  parsed from the FP16 ONNX (`model_fp16.onnx`, float32 inputs/outputs, normalisation and softmax
  already float32 inside), and every tensor keeps the type the graph gives it.
- TensorRT 10 parses the FP32 ONNX and sets the FP16 builder flag; normalisation and softmax layers
  are pinned to FP32 with OBEY_PRECISION_CONSTRAINTS (LayerNorm overflows in FP16: D-FINE issue #98).

A dynamic batch gets one optimisation profile (1 .. max batch, optimum at the configured batch); H and
W stay static. The import is guarded: without TensorRT or a GPU, `ExportBackendUnavailable` says which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfineseg.export.context import Built, ExportContext
from dfineseg.export.errors import ExportBackendUnavailable, ExportError
from dfineseg.export.meta import with_precision, write_sidecar
from dfineseg.export.publish import ArtefactRecord, artefact_size
from dfineseg.infer.graph import INPUT_NAME
from dfineseg.utils.io import atomic_write_bytes

if TYPE_CHECKING:
    from dfineseg.export.formats import Artefact


@dataclass
class EngineInfo:
    path: Path
    sidecar: Path
    tensorrt_version: str
    strongly_typed: bool
    source_onnx: Path
    seconds: float


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportBackendUnavailable(
            "TensorRT export is not possible here: the tensorrt package is not installed "
            f'(pip install "dfineseg[tensorrt]" on a machine with an NVIDIA GPU; {exc}). '
            "Export format=onnx or format=openvino instead, or run this on the GPU machine."
        ) from None
    return trt


def require_gpu() -> None:
    """Fail clearly when no CUDA device is visible (TensorRT builds for the GPU it runs on)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            cudart = None
    if cudart is None:
        return  # the builder itself reports a missing GPU; see build_engine
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise ExportBackendUnavailable(f"TensorRT export needs an NVIDIA GPU: CUDA reports no device ({err}).")


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _pin_fp32(trt: Any, network: Any) -> int:
    """TensorRT 10 (weakly typed): keep normalisation and softmax layers in FP32; returns how many."""
    sensitive = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, n)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in sensitive:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    onnx_fp32: Path,
    onnx_fp16: Path | None,
    engine_path: Path,
    *,
    imgsz: tuple[int, int],
    batch: int,
    dynamic_batch: bool,
    max_batch: int | None = None,
    workspace_gb: float = 4.0,
    metadata: dict[str, str],
) -> EngineInfo:
    trt = import_tensorrt()
    require_gpu()
    t0 = time.perf_counter()
    major = trt_major(trt)
    strongly_typed = major >= 11
    source = onnx_fp16 if strongly_typed else onnx_fp32
    if source is None or not Path(source).is_file():
        raise ExportError(
            f"TensorRT {trt.__version__} needs {'the FP16 ONNX (model_fp16.onnx)' if strongly_typed else 'the FP32 ONNX'}; "
            f"it was not found at {source}"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise ExportBackendUnavailable("TensorRT could not create a builder: no usable NVIDIA GPU/driver here.")
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(source).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{source}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_fp32(trt, network)
    h, w = imgsz
    if dynamic_batch:
        top = max(max_batch or batch, batch, 1)
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, (1, 3, h, w), (max(batch, 1), 3, h, w), (top, 3, h, w))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{engine_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    sidecar = engine_path.with_name(engine_path.name + ".json")
    write_sidecar(
        sidecar,
        {**metadata, "precision": "fp16", "tensorrt_version": str(trt.__version__),
         "max_batch": str(max(max_batch or batch, batch) if dynamic_batch else batch)},
    )
    return EngineInfo(engine_path, sidecar, str(trt.__version__), strongly_typed, Path(source), time.perf_counter() - t0)


def build_tensorrt(ctx: ExportContext, artefact: Artefact) -> Built:
    """format=tensorrt: an FP16 engine for this machine's GPU, from the FP16 ONNX (TensorRT 11) or the FP32
    one (TensorRT 10); no twin (the raw check is skipped), checked on cuda."""
    plan = ctx.plan
    engine = ctx.run.start(artefact.key)
    info = build_engine(
        ctx.made["onnx"], ctx.made.get("onnx_fp16"), engine, imgsz=plan.imgsz, batch=plan.batch,
        dynamic_batch=plan.dynamic_batch, max_batch=max(plan.batch, 8) if plan.dynamic_batch else plan.batch,
        workspace_gb=plan.workspace_gb, metadata=with_precision(ctx.metadata, "fp16"),
    )
    ctx.say(f"TensorRT {info.tensorrt_version}: built ({artefact_size(engine) / 1e6:.1f} MB, {info.seconds:.1f} s)")
    record = ArtefactRecord(artefact.key, engine, artefact.precision, info.seconds, extra={
        "tensorrt_version": info.tensorrt_version, "strongly_typed": info.strongly_typed})
    return Built(record, engine, None, {"device": "cuda"})
