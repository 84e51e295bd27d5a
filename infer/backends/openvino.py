"""OpenVINO backend: IR (.xml + .bin) on CPU/GPU/NPU/AUTO with explicit precision and performance hints.

`precision=None` leaves the device's own choice, which is bf16 on CPUs with AVX512-BF16/AMX and f32
elsewhere; `precision="f32"` pins full precision (what parity checks and FP32 measurements need).
Either way the precision the compiled model really computes in is read back
(`INFERENCE_PRECISION_HINT`) and reported, because a hint the device cannot honour (f16 on most x86
CPUs) is silently replaced by f32.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.backends import (
    INPUT_NAME,
    Backend,
    BackendUnavailableError,
    ModelFileError,
    PredictorError,
    RuntimeInfo,
    import_runtime,
)
from dfineseg.infer.backends._common import input_hw_from, runtime_message
from dfineseg.infer.graph import KNOWN_OUTPUTS

_PRECISIONS = {"f32": "f32", "fp32": "f32", "f16": "f16", "fp16": "f16", "half": "f16", "bf16": "bf16"}
_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT", "cumulative_throughput": "CUMULATIVE_THROUGHPUT"}
# rt_info sections searched for the dfineseg metadata, most specific first: the exporter's own section,
# then the ONNX metadata_props that `openvino.convert_model` copies under "framework".
_META_SECTIONS = ("model_info", "dfineseg", "framework")


def _any_to_str(value: Any) -> str:
    return value.astype(str) if hasattr(value, "astype") else str(value)


def read_rt_metadata(model: Any) -> dict[str, str]:
    """The flat dfineseg metadata map stored in an OpenVINO model's rt_info."""
    info = model.get_rt_info()
    found: dict[str, str] = {}
    top = {k: info[k] for k in info.keys()}
    for section in reversed(_META_SECTIONS):
        nested = top.get(section)
        if isinstance(nested, dict):
            found.update({k: _any_to_str(v) for k, v in nested.items()})
    # keys written at the top level (set_rt_info(value, key)) are also accepted
    for key, value in top.items():
        if key.startswith("dfineseg") or key in ("names", "category_ids", "imgsz", "resize", "conf", "task", "topk"):
            if not isinstance(value, dict):
                found.setdefault(key, _any_to_str(value))
    return found


# The operations that hold nearly all of a model's multiply-adds, as the CPU plugin names them in the
# compiled (runtime) model; their runtime precision says where an INT8 model really computes.
_HEAVY_OPS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
_INTEGER = ("i8", "u8")


def operation_precisions(compiled: Any) -> dict[str, int]:
    """{runtime precision: count} over the compiled model's heavy operations (convolutions, matmuls);
    empty when the device does not expose a runtime model."""
    try:
        ops = compiled.get_runtime_model().get_ordered_ops()
    except Exception:  # GPU/NPU plugins may not report one: absence is not an error, it is reported as such
        return {}
    counts: dict[str, int] = {}
    for op in ops:
        info = op.get_rt_info()
        if "layerType" in info and _any_to_str(info["layerType"]) in _HEAVY_OPS and "runtimePrecision" in info:
            precision = _any_to_str(info["runtimePrecision"]).lower()
            counts[precision] = counts.get(precision, 0) + 1
    return counts


def describe_precision(hint: str, counts: dict[str, int]) -> tuple[str, float | None]:
    """(what the model computes in, the float share of its heavy operations): a quantised model computes in
    int8 plus the hint's float precision for the operations kept in float ('int8+bf16')."""
    total = sum(counts.values())
    if not total:
        return hint, None
    integer = sum(n for p, n in counts.items() if p in _INTEGER)
    float_share = 1.0 - integer / total
    return (f"int8+{hint}" if integer else hint), float_share


def compiled_precision(compiled: Any, counts: dict[str, int] | None = None) -> tuple[str, float | None]:
    """What a compiled model computes in ('f32', 'bf16', 'int8+bf16', ...) and the float share of its heavy
    operations (None when the device exposes no runtime model); `counts`: its `operation_precisions`."""
    try:
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # not every device reports every property; absence is not an error
        hint = None
    name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint or "")
    return describe_precision(name or "f32", operation_precisions(compiled) if counts is None else counts)


def _device_name(device: str | None) -> str:
    text = (device or "cpu").strip()
    kind, _, index = text.replace(":", ".").partition(".")
    upper = kind.upper()
    if upper not in ("CPU", "GPU", "NPU", "AUTO", "MULTI", "HETERO"):
        raise PredictorError(f"OpenVINO device '{device}' is not one of cpu, gpu, gpu.N, npu, auto")
    return f"{upper}.{index}" if index else upper


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        precision: str | None = None,
        performance: str = "latency",
        threads: int | None = None,
        num_requests: int | None = None,
        **_: Any,
    ) -> None:
        ov = import_runtime("openvino", "openvino")
        self._ov = ov
        self.path = Path(path)
        if not self.path.with_suffix(".bin").is_file():
            raise ModelFileError(f"{self.path}: the weights file {self.path.with_suffix('.bin').name} is missing next to it")
        core = ov.Core()
        device_name = _device_name(device)
        base = device_name.split(".")[0]
        if base in ("CPU", "GPU", "NPU") and not any(d.split(".")[0] == base for d in core.available_devices):
            raise BackendUnavailableError(
                f"OpenVINO has no {base} device here (available: {', '.join(core.available_devices)}); use device=cpu"
            )
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with parser messages
            reason = runtime_message(exc)
            raise ModelFileError(
                f"{self.path}: OpenVINO cannot read this model: {reason}\n"
                "  fix: is it a complete IR (.xml with its .bin) from `dfineseg export format=openvino`? Export it "
                f"again (an IR from a newer OpenVINO than {getattr(ov, '__version__', 'this one')} needs that "
                "version: pip install -U openvino)"
            ) from None
        self.metadata = read_rt_metadata(model)
        if len(model.inputs) != 1 or INPUT_NAME not in model.inputs[0].get_names():
            raise ModelFileError(
                f"{self.path}: not a dfineseg model: inputs {[sorted(i.get_names()) for i in model.inputs]}, "
                f"expected ['{INPUT_NAME}']"
            )
        config: dict[str, Any] = {}
        if performance:
            if performance.lower() not in _HINTS:
                raise PredictorError(f"performance hint '{performance}' is not one of {', '.join(_HINTS)}")
            config["PERFORMANCE_HINT"] = _HINTS[performance.lower()]
        if precision:
            if str(precision).lower() not in _PRECISIONS:
                raise PredictorError(f"precision '{precision}' is not one of f32, f16, bf16")
            config["INFERENCE_PRECISION_HINT"] = _PRECISIONS[str(precision).lower()]
        if threads and base == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, device_name, config)
        except Exception as exc:
            raise PredictorError(
                f"{self.path}: OpenVINO cannot compile this model for {device_name} with {config} "
                f"({runtime_message(exc)}); try device=cpu, or another precision="
            ) from None
        self.output_names = self._check_outputs(self._output_name(o) for o in self.compiled.outputs)
        pshape = model.inputs[0].get_partial_shape()
        shape = [d.get_length() if d.is_static else None for d in pshape]
        op_precisions = operation_precisions(self.compiled)
        precision_name, float_share = compiled_precision(self.compiled, op_precisions)
        self.runtime = RuntimeInfo(
            backend=self.name,
            device=device_name,
            precision=precision_name,
            batch=shape[0] if shape and shape[0] else None,
            input_hw=input_hw_from(shape, self.metadata, self.path),
            extra={
                "performance_hint": str(self._property("PERFORMANCE_HINT") or ""),
                "threads": self._property("INFERENCE_NUM_THREADS"),
                "optimal_requests": self._property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"),
                "requested_precision": config.get("INFERENCE_PRECISION_HINT"),
                # share of convolutions/matmuls that run in float (1.0 for a float model, None: not reported)
                "float_op_share": float_share,
                "op_precisions": op_precisions,
            },
        )
        # at least two in flight, so a video frame is computed while the previous one is post-processed
        # (the latency hint reports 1 optimal request, which would serialise the pipeline)
        self.num_requests = int(num_requests or max(2, int(self.runtime.extra.get("optimal_requests") or 0)))
        self._request = self.compiled.create_infer_request()

    @staticmethod
    def _output_name(output: Any) -> str:
        names = output.get_names()
        known = [n for n in KNOWN_OUTPUTS if n in names]
        return known[0] if known else output.get_any_name()

    def _property(self, key: str) -> Any:
        try:
            return self.compiled.get_property(key)
        except Exception:  # not every device reports every property; absence is not an error
            return None

    def _collect(self, request: Any) -> dict[str, np.ndarray]:
        # copies: the request's tensors are reused by the next inference
        return {name: np.array(request.get_output_tensor(i).data) for i, name in enumerate(self.output_names)}

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._check_batch(batch)
        self._request.infer({0: batch})
        return self._collect(self._request)

    def forward_stream(self, batches: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
        """Up to `num_requests` inferences in flight; results come back in input order.

        Plain infer requests, each waited for in turn (`wait()` releases the GIL), and no completion
        callback: OpenVINO runs a Python callback (AsyncInferQueue's) on its own stream thread, which must
        take the GIL. When the last callback was still waiting for it as the compiled model was destroyed
        (the destructor holds the GIL and joins that thread), the process hung forever: seen in CI and
        reproduced here (gdb: CPUStreamsExecutor's destructor joining a thread blocked in take_gil). With
        no Python code on OpenVINO's threads that wait cannot arise."""
        idle = [self.compiled.create_infer_request() for _ in range(self.num_requests)]
        in_flight: deque[tuple[Any, Any]] = deque()  # (request, context), oldest first
        try:
            for batch, ctx in batches:
                batch = self._check_batch(batch)
                if idle:
                    request = idle.pop()
                    request.start_async({0: batch})
                    in_flight.append((request, ctx))
                    continue
                # every request is busy: take the oldest result, reuse its request for this batch at once
                # (so the runtime computes while the caller post-processes), then hand the result out
                request, done_ctx = in_flight.popleft()
                request.wait()
                outputs = self._collect(request)
                request.start_async({0: batch})
                in_flight.append((request, ctx))
                yield outputs, done_ctx
            while in_flight:
                request, done_ctx = in_flight.popleft()
                request.wait()
                yield self._collect(request), done_ctx
        finally:
            # the caller stopped early or an error is on its way: let the queued inferences end first
            for request, _ in in_flight:
                request.wait()

    def close(self) -> None:
        self._request = None
        self.compiled = None


def open_backend(path: Path, **options: Any) -> OpenVinoBackend:
    return OpenVinoBackend(path, **options)
