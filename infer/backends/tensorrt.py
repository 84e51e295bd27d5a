"""TensorRT backend: a serialised engine run through cuda-python, so no torch is needed on the device.

Tensors are bound by name (TensorRT 10 I/O-tensor API), one CUDA stream carries copy-in, execution and
copy-out, and a dynamic batch is set per call with `set_input_shape` inside the engine's optimisation
profile. Device buffers are allocated once for the profile's largest batch.

An engine only runs on the TensorRT version and GPU family that built it, so a failed deserialisation
says exactly that. The metadata lives in a JSON sidecar (`model.engine.json`) written by the exporter.
"""

from __future__ import annotations

import json
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
)
from dfineseg.infer.backends._common import parse_device, precision_from_metadata

_UNAVAILABLE = (
    "TensorRT engines need an NVIDIA GPU with the tensorrt and cuda-python packages "
    '(pip install "dfineseg[tensorrt]"); '
)


def _import_cuda_runtime() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python layout

        return cudart
    except ImportError as exc:
        raise BackendUnavailableError(_UNAVAILABLE + f"cuda-python is not importable ({exc})") from None


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt

        return trt
    except ImportError as exc:
        raise BackendUnavailableError(_UNAVAILABLE + f"tensorrt is not importable ({exc})") from None


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def read_sidecar(engine: Path) -> dict[str, str]:
    for candidate in (sidecar_path(engine), engine.with_suffix(".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelFileError(f"{candidate}: unreadable metadata sidecar ({exc}); re-export the engine") from None
            if not isinstance(data, dict):
                raise ModelFileError(f"{candidate}: the metadata sidecar must be a JSON object")
            # the sidecar may hold plain JSON values; the metadata map is str -> str (JSON-encoded values)
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    return {}


class _Cuda:
    """Thin checked wrapper over the cuda-python runtime calls this backend uses."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            raise BackendUnavailableError(f"CUDA call {what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest


class TensorRtBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda", **_: Any) -> None:
        trt = _import_tensorrt()
        cuda = _Cuda(_import_cuda_runtime())
        self.path = Path(path)
        self._cuda = cuda
        self._buffers: list[Any] = []
        _, index = parse_device(device if device not in (None, "cpu", "auto") else "cuda", allowed=("cuda",))
        err, count = cuda.rt.cudaGetDeviceCount()
        if err != cuda.rt.cudaError_t.cudaSuccess or count == 0:
            raise BackendUnavailableError(_UNAVAILABLE + "no CUDA GPU is visible here")
        self.device_index = index or 0
        cuda.check(cuda.rt.cudaSetDevice(self.device_index), "cudaSetDevice")
        self.metadata = read_sidecar(self.path)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            blob = self.path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{self.path}: cannot read the engine ({exc})") from None
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ModelFileError(
                f"{self.path}: TensorRT {trt.__version__} cannot deserialise this engine: it is corrupt, or was "
                "built by another TensorRT version or for another GPU; rebuild it here with "
                "`dfineseg export format=tensorrt`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = cuda.check(cuda.rt.cudaStreamCreate(), "cudaStreamCreate")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME]:
            raise ModelFileError(f"{self.path}: not a dfineseg engine: inputs {inputs}, expected ['{INPUT_NAME}']")
        self.output_names = self._check_outputs(n for n in names if n not in inputs)
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

        shape = tuple(self.engine.get_tensor_shape(INPUT_NAME))
        if shape[0] == -1:
            _, _, max_shape = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
            batch, max_batch = None, int(max_shape[0])
        else:
            batch, max_batch = int(shape[0]), int(shape[0])
        if shape[2] <= 0 or shape[3] <= 0:
            raise ModelFileError(f"{self.path}: dynamic input height/width are not supported (shape {shape})")
        self._max_batch = max_batch

        # Allocate every buffer once, for the largest batch the profile allows.
        self.context.set_input_shape(INPUT_NAME, (max_batch, *shape[1:]))
        self._device_ptr: dict[str, int] = {}
        for n in names:
            full = tuple(self.context.get_tensor_shape(n))
            nbytes = int(np.prod(full)) * self._dtypes[n].itemsize
            ptr = cuda.check(cuda.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self._buffers.append(ptr)
            self._device_ptr[n] = int(ptr)
            self.context.set_tensor_address(n, int(ptr))

        self.runtime = RuntimeInfo(
            backend=self.name,
            device=f"cuda:{self.device_index}",
            precision=precision_from_metadata(self.metadata, default="fp16"),
            batch=batch,
            input_hw=(int(shape[2]), int(shape[3])),
            max_batch=max_batch,
            extra={"tensorrt": trt.__version__},
        )

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._check_batch(batch)
        if self._dtypes[INPUT_NAME] != np.float32:
            batch = batch.astype(self._dtypes[INPUT_NAME])
        rt, check = self._cuda.rt, self._cuda.check
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if not self.context.set_input_shape(INPUT_NAME, batch.shape):
            raise PredictorError(f"{self.path}: TensorRT refused input shape {batch.shape}")
        check(rt.cudaMemcpyAsync(self._device_ptr[INPUT_NAME], batch.ctypes.data, batch.nbytes, h2d, self.stream), "copy in")
        if not self.context.execute_async_v3(int(self.stream)):
            raise PredictorError(f"{self.path}: TensorRT execution failed (see the TensorRT log above)")
        outputs: dict[str, np.ndarray] = {}
        for n in self.output_names:
            out = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n])
            check(rt.cudaMemcpyAsync(out.ctypes.data, self._device_ptr[n], out.nbytes, d2h, self.stream), "copy out")
            outputs[n] = out
        check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in outputs.items()}

    def close(self) -> None:
        rt = self._cuda.rt
        for ptr in self._buffers:
            rt.cudaFree(ptr)
        self._buffers = []
        if getattr(self, "stream", None) is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn the CUDA runtime down already
            pass


def open_backend(path: Path, **options: Any) -> TensorRtBackend:
    return TensorRtBackend(path, **options)
