"""Inference backends: one class per runtime, each turning a preprocessed batch into the graph outputs.

Every backend has the same small surface so the Predictor (and the benchmark, which times `forward`
apart from pre/post-processing) never cares which runtime runs:

- `forward(batch: float32 [B,3,H,W]) -> {"scores", "labels", "boxes"[, "mask_features", "mask_embed"]: np.ndarray}`
  (the names of `dfineseg.infer.graph`; a schema-1 segment file gives "mask_logits" instead of the pair)
- `metadata`: the flat str->str map stored in the model file at export (see `dfineseg.infer.metadata`)
- `runtime`: what really runs (provider/device actually used, precision it computes in, batch limits)

The runtime packages are imported inside each backend module, so importing this package needs none of
them, and only `torch.py` ever imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.errors import BackendUnavailableError, UserError
from dfineseg.infer.graph import DETECTION_OUTPUTS as REQUIRED_OUTPUTS
from dfineseg.infer.graph import INPUT_NAME, OUTPUT_NAMES


@dataclass(frozen=True)
class Runtime:
    """A backend module of this package, the file suffixes it opens, and how error messages name them."""

    backend: str  # the module dfineseg.infer.backends.<backend>, with `open_backend(path, **options)`
    suffixes: tuple[str, ...]
    hint: str


# The one table of runtimes: a new export format adds its row here (and its module); folders are OpenVINO
# IR folders (export writes openvino/model.xml + .bin). The export side's table is dfineseg.export.formats.
RUNTIMES = (
    Runtime("torch", (".pt", ".pth"), ".pt (checkpoint)"),
    Runtime("onnxruntime", (".onnx",), ".onnx"),
    Runtime("openvino", (".xml",), ".xml or a folder holding one (OpenVINO IR)"),
    Runtime("tensorrt", (".engine", ".plan"), ".engine (TensorRT)"),
)
SUFFIXES = {suffix: r.backend for r in RUNTIMES for suffix in r.suffixes}  # suffix -> backend module
BACKENDS = tuple(r.backend for r in RUNTIMES)
# Options any backend accepts; each uses those that apply to it and ignores the rest, so one call
# (`Predictor.load(path, precision="f32", threads=4)`) works for every file type.
KNOWN_OPTIONS = frozenset({"device", "precision", "threads", "performance", "num_requests", "half", "topk"})
FORMAT_HINT = ", ".join(r.hint for r in RUNTIMES)


class PredictorError(UserError):
    """A problem running a model on user input; the message names the file and what to do."""


class ModelFileError(PredictorError):
    """The model file is missing, corrupt, of an unknown format or from a newer dfineseg."""


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "INPUT_NAME",
    "ModelFileError",
    "OUTPUT_NAMES",
    "PredictorError",
    "RuntimeInfo",
    "detect_backend",
    "load_backend",
    "resolve_model_path",
]


@dataclass
class RuntimeInfo:
    """What actually runs, as reported by the runtime after loading (not what was asked for)."""

    backend: str
    device: str
    precision: str
    batch: int | None  # fixed batch size of the graph, or None when the batch dimension is dynamic
    input_hw: tuple[int, int]
    max_batch: int | None = None  # upper bound of a dynamic batch (TensorRT profile), None: unbounded
    extra: dict[str, Any] = field(default_factory=dict)

    def accepts_batch(self, n: int) -> bool:
        if self.batch is not None:
            return n == self.batch
        return self.max_batch is None or n <= self.max_batch


class Backend:
    """Base class: subclasses set `path`, `metadata`, `runtime`, `output_names` and implement `forward`."""

    name = "base"
    path: Path
    metadata: dict[str, str]
    runtime: RuntimeInfo
    output_names: tuple[str, ...]

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def info(self) -> Any:
        """The decoded metadata (`dfineseg.infer.metadata.ModelInfo`): names, category ids, imgsz, ..."""
        cached = self.__dict__.get("_info")
        if cached is None:
            from dfineseg.infer.metadata import MetadataError, decode_metadata

            try:
                cached = decode_metadata(self.metadata, source=str(self.path))
            except MetadataError as exc:
                raise ModelFileError(str(exc)) from None
            self.__dict__["_info"] = cached
        return cached

    def forward_stream(self, batches: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
        """Run a stream of (batch, context) pairs, yielding (outputs, context) in input order.

        The default runs them one after the other; OpenVINO overrides it with asynchronous infer
        requests so the next video frame is computed while the previous one is post-processed.
        """
        for batch, ctx in batches:
            yield self.forward(batch), ctx

    def close(self) -> None:
        """Release runtime resources (device memory, sessions); the default has nothing to free."""

    def _check_outputs(self, names: Iterable[str]) -> tuple[str, ...]:
        names = tuple(names)
        missing = [n for n in REQUIRED_OUTPUTS if n not in names]
        if missing:
            raise ModelFileError(
                f"{self.path}: not a dfineseg model: outputs {list(names)} lack {missing} "
                f"(expected {list(OUTPUT_NAMES)}); export it with `dfineseg export`"
            )
        return names

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != tuple(self.runtime.input_hw):
            raise PredictorError(
                f"{self.path}: input batch has shape {tuple(batch.shape)}, the model expects "
                f"[B,3,{self.runtime.input_hw[0]},{self.runtime.input_hw[1]}]"
            )
        if not self.runtime.accepts_batch(batch.shape[0]):
            raise PredictorError(
                f"{self.path}: batch of {batch.shape[0]} images, but the model takes batch "
                f"{self.runtime.batch if self.runtime.batch is not None else f'<= {self.runtime.max_batch}'}"
            )
        return np.ascontiguousarray(batch, dtype=np.float32)

    def __repr__(self) -> str:
        r = self.runtime
        return f"{type(self).__name__}({self.path}, device={r.device}, precision={r.precision}, batch={r.batch})"


def resolve_model_path(path: str | Path) -> tuple[Path, str]:
    """The model file and its backend name; errors name the path and list the accepted formats."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"model file not found: {p} (expected {FORMAT_HINT})")
    if p.is_dir():
        xml = sorted(p.glob("*.xml"))
        if len(xml) == 1:
            return xml[0], "openvino"
        if (p / "model.xml").is_file():
            return p / "model.xml", "openvino"
        found = ", ".join(x.name for x in xml) if xml else "no .xml file"
        raise ModelFileError(f"{p} is a folder with {found}; pass one model file ({FORMAT_HINT})")
    suffix = p.suffix.lower()
    if suffix == ".bin" and p.with_suffix(".xml").is_file():
        return p.with_suffix(".xml"), "openvino"
    if suffix not in SUFFIXES:
        raise ModelFileError(f"{p}: unknown model format '{p.suffix or '(no suffix)'}'; expected {FORMAT_HINT}")
    return p, SUFFIXES[suffix]


def detect_backend(path: str | Path) -> str:
    return resolve_model_path(path)[1]


_IMPORT_HINTS = {
    "onnxruntime": 'ONNX Runtime is not installed: pip install "dfineseg[ort]" (or dfineseg[ort-gpu])',
    "openvino": 'OpenVINO is not installed: pip install "dfineseg[openvino]"',
    "tensorrt": 'TensorRT is not available: pip install "dfineseg[tensorrt]" on a machine with an NVIDIA GPU',
    "torch": 'PyTorch is not installed: pip install "dfineseg[train]" (or run an exported .onnx / OpenVINO model)',
}


def load_backend(path: str | Path, backend: str | None = None, **options: Any) -> Backend:
    """Open `path` with the backend its suffix names (or `backend`), passing runtime `options` on."""
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise PredictorError(f"unknown backend option(s) {unknown}; known: {', '.join(sorted(KNOWN_OPTIONS))}")
    model_path, detected = resolve_model_path(path)
    name = backend or detected
    if name not in BACKENDS:
        raise PredictorError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"dfineseg.infer.backends.{name}")
    opener: Callable[..., Backend] = module.open_backend
    return opener(model_path, **options)


def import_runtime(module: str, backend: str) -> Any:
    """Import a runtime package or raise BackendUnavailableError with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # also covers a package that is present but broken (missing .so)
        raise BackendUnavailableError(f"{_IMPORT_HINTS[backend]} ({exc})") from None
