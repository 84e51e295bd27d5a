"""ONNX Runtime backend: CPU everywhere, CUDA / TensorRT execution providers where installed.

ONNX Runtime silently falls back to the CPU when a GPU provider cannot start (missing CUDA libraries),
so the providers really used are read back from the session: an explicit GPU request that ends up on
the CPU is an error rather than a slow surprise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.backends import (
    INPUT_NAME,
    Backend,
    BackendUnavailableError,
    ModelFileError,
    RuntimeInfo,
    import_runtime,
)
from dfineseg.infer.backends._common import (
    input_hw_from,
    onnx_load_hint,
    parse_device,
    precision_from_metadata,
    runtime_message,
)

# Requested device -> provider chain (first choice first; CPU last so unsupported nodes still run).
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _provider_chain(ort: Any, device: str) -> tuple[list[Any], str]:
    kind, index = parse_device(device, allowed=("cpu", "cuda", "tensorrt", "auto"))
    available = ort.get_available_providers()
    if kind == "auto":
        kind = next((k for k in ("tensorrt", "cuda") if _PROVIDERS[k][0] in available), "cpu")
    wanted = _PROVIDERS[kind][0]
    if wanted not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime has no {wanted} here (available: {', '.join(available)}); "
            "install onnxruntime-gpu with a matching CUDA, or use device=cpu"
        )
    chain: list[Any] = []
    for name in _PROVIDERS[kind]:
        if name not in available:
            continue
        chain.append((name, {"device_id": index}) if name != "CPUExecutionProvider" and index is not None else name)
    return chain, wanted


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, performance: str = "latency",
                 **_: Any) -> None:
        ort = import_runtime("onnxruntime", "onnxruntime")
        self.path = Path(path)
        # performance=throughput: video frames are pipelined (next frame prepared, last one drawn, while ORT
        # computes); latency: one after the other. Measured in docs/BENCHMARKS.md, "Throughput".
        self.pipeline = str(performance).lower() == "throughput"
        providers, wanted = _provider_chain(ort, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # warnings about unused initialisers are noise for users
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types for bad files
            reason = runtime_message(exc)
            raise ModelFileError(
                f"{self.path}: ONNX Runtime cannot load this file: {reason}\n"
                f"  fix: {onnx_load_hint(reason, 'onnxruntime', getattr(ort, '__version__', '?'))}"
            ) from None
        used = self.session.get_providers()
        if used[0] != wanted:
            raise BackendUnavailableError(
                f"{self.path}: asked for {wanted} but ONNX Runtime runs on {used[0]} "
                "(the GPU provider failed to start; check the CUDA/cuDNN/TensorRT libraries) - or use device=cpu"
            )
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelFileError(
                f"{self.path}: not a dfineseg model: inputs {[i.name for i in inputs]}, expected ['{INPUT_NAME}']"
            )
        shape = inputs[0].shape
        self._input_dtype = _ONNX_TYPES.get(inputs[0].type, np.float32)
        self.output_names = self._check_outputs(o.name for o in self.session.get_outputs())
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.runtime = RuntimeInfo(
            backend=self.name,
            device=used[0],
            precision=precision_from_metadata(self.metadata, default="fp32"),
            batch=batch,
            input_hw=input_hw_from(shape, self.metadata, self.path),
            extra={"providers": used, "threads": threads},
        )

    def forward_stream(self, batches):
        if not self.pipeline:
            yield from super().forward_stream(batches)
            return
        from dfineseg.infer.batching import pipelined

        yield from pipelined(self.forward, batches)

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._check_batch(batch)
        if self._input_dtype is not np.float32:
            batch = batch.astype(self._input_dtype)
        outputs = self.session.run(list(self.output_names), {INPUT_NAME: batch})
        return {
            name: (out.astype(np.float32) if out.dtype == np.float16 else out)
            for name, out in zip(self.output_names, outputs)
        }

    def close(self) -> None:
        self.session = None


def open_backend(path: Path, **options: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(path, **options)
