"""The one registry of export formats: what `dfineseg export format=...` makes, and how.

A format (`ExportFormat`: onnx, openvino, tensorrt) is what a user asks for; it makes one or more
artefacts (`Artefact`: one file or folder each, e.g. openvino -> `openvino/`, and with half=true
`openvino_fp16/`). Each artefact here says where it lives in the out folder and where a failed one is
kept aside, its precision, its parity tolerance, its build step (`module:function`, imported only when
the artefact is made) and its `dfineseg bench` row. The export options that add artefacts to a format
(`ExportOption`: half, int8) say what they need.

Read from here: the config's `format=` and `bench.formats` values (`EXPORT_FORMAT_NAMES`,
`BENCH_FORMAT_NAMES`), `export_model`'s toolchain checks (`check_toolchains`), its plan
(`planned_artefacts`) and build loop, the names checked in the out folder before any work and the
summary (`dfineseg.export.publish`), and the bench's rows (`dfineseg.benchmarks.harness`).

Adding a format touches three places:
1. this file: an `ExportFormat` (its toolchain checks) and its `Artefact`(s) with their bench rows;
2. the format's own module under `export/`: its build step `build(ctx, artefact) -> Built` (see
   `dfineseg.export.context`), which makes the artefact in the staging folder from the FP32 ONNX
   (`ctx.made["onnx"]`), and its toolchain's import check;
3. its runtime backend under `infer/backends/` (a module with `open_backend`, and its row in
   `RUNTIMES` there), so that the Predictor, the parity check and the bench open the file.
A new precision also adds its limits to `TOLERANCES` (`dfineseg.export.tolerances`).

Import-light on purpose (the standard library only): `dfineseg.config` reads the names from here, and
importing the config must not import torch, onnx or openvino.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dfineseg.export.context import Built, ExportContext


def _call(target: str, *args: Any) -> Any:
    """Call `"package.module:function"`, importing the module now (the heavy imports live there)."""
    module, _, name = target.partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return function(*args)


@dataclass(frozen=True)
class BenchRow:
    """A row of `dfineseg bench`: the artefact opened by the Predictor with these options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Artefact:
    """One file or folder an export makes."""

    key: str  # the summary's key and `export_model`'s result key
    format: str  # the ExportFormat that makes it
    name: str  # where it lives in the out folder
    failed: str  # where one that failed its check is kept aside
    precision: str  # what it computes in (fp32 / fp16 / int8), in its metadata and its summary entry
    tolerance: str  # its parity limits: a key of TOLERANCES, or "int8" (judged by the F1 drop only)
    build: str  # "module:function(ctx, artefact) -> Built": makes it in the staging folder
    when: str = "always"  # made with its format always, or only with the export option of that name
    folder: bool = False  # a folder (its parity report inside it, as parity.json)
    opens: str | None = None  # in a folder: the file a runtime opens
    sidecar: bool = False  # a metadata JSON next to it (`<name>.json`) that moves with it
    bench: BenchRow | None = None

    def files(self, name: str) -> list[str]:
        """`name` plus the files next to it that belong to it (a file artefact's report, an engine's sidecar)."""
        if self.folder:
            return [name]
        return [name, name + ".parity.json", *([name + ".json"] if self.sidecar else [])]

    @property
    def entry(self) -> str:
        """The path, relative to the out folder, that the Predictor opens."""
        return f"{self.name}/{self.opens}" if self.folder and self.opens else self.name

    def export_settings(self) -> dict[str, Any]:
        """The `export` config that makes this artefact (the bench exports a missing one with it)."""
        return {"formats": [self.format], **({} if self.when == "always" else {self.when: True})}

    def make(self, ctx: ExportContext) -> Built:
        return _call(self.build, ctx, self)


@dataclass(frozen=True)
class ExportFormat:
    """A value of `format=`: the artefacts it makes are those whose `format` names it."""

    name: str
    # "module:function" checks run before any work; each raises ExportBackendUnavailable naming the install
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # artefacts of another format it is built from, made with it


@dataclass(frozen=True)
class ExportOption:
    """An export switch that adds artefacts (`half=true`, `int8=true`)."""

    name: str
    requires: tuple[str, ...] = ()
    format: str | None = None  # the format it works on: refused (`refusal`) when that format is not asked for
    refusal: str = ""


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx"),
    ExportFormat("openvino", requires=("dfineseg.export.openvino_export:import_openvino",)),
    # TensorRT 11 builds strongly typed networks only: it parses the FP16 ONNX (see tensorrt_export).
    ExportFormat("tensorrt", needs=("onnx_fp16",), requires=(
        "dfineseg.export.tensorrt_export:import_tensorrt", "dfineseg.export.tensorrt_export:require_gpu")),
)}

OPTIONS: dict[str, ExportOption] = {o.name: o for o in (
    ExportOption("half"),
    ExportOption("int8", requires=("dfineseg.export.int8:import_nncf",), format="openvino", refusal=(
        "export.int8=true quantises the OpenVINO model: add openvino to format= (e.g. format=openvino int8=true)")),
)}

# In the order an export makes them: each starts from the FP32 ONNX, INT8 from the FP32 IR, TensorRT
# from the FP16 ONNX, so those come first.
ARTEFACTS: dict[str, Artefact] = {a.key: a for a in (
    Artefact("onnx", "onnx", "model.onnx", "model.failed.onnx", "fp32", "fp32",
             "dfineseg.export.onnx_export:build_onnx",
             bench=BenchRow("onnx", note="ONNX Runtime CPU, fp32")),
    Artefact("onnx_fp16", "onnx", "model_fp16.onnx", "model_fp16.failed.onnx", "fp16", "fp16",
             "dfineseg.export.onnx_export:build_fp16_onnx", when="half",
             bench=BenchRow("onnx-fp16", note="FP16 ONNX (the TensorRT 11 input) in ONNX Runtime")),
    Artefact("openvino", "openvino", "openvino", "openvino.failed", "fp32", "fp32",
             "dfineseg.export.openvino_export:build_ir", folder=True, opens="model.xml",
             bench=BenchRow("ov-fp32", {"precision": "f32"}, "OpenVINO, FP32 weights, INFERENCE_PRECISION_HINT=f32")),
    Artefact("openvino_fp16", "openvino", "openvino_fp16", "openvino_fp16.failed", "fp16", "fp16",
             "dfineseg.export.openvino_export:build_ir", when="half", folder=True, opens="model.xml",
             bench=BenchRow("ov-fp16", note="OpenVINO, FP16-compressed weights, device default precision")),
    Artefact("openvino_int8", "openvino", "openvino_int8", "openvino_int8.failed", "int8", "int8",
             "dfineseg.export.int8:build_int8", when="int8", folder=True, opens="model.xml",
             bench=BenchRow("ov-int8", note="OpenVINO INT8 (NNCF), device default precision for the float parts")),
    Artefact("tensorrt", "tensorrt", "model.engine", "model.failed.engine", "fp16", "fp16",
             "dfineseg.export.tensorrt_export:build_tensorrt", sidecar=True,
             bench=BenchRow("trt-fp16", {"device": "cuda"}, "TensorRT FP16 engine")),
)}

# The bench's rows: the checkpoint itself (no artefact), then every artefact's row.
TORCH_ROW = BenchRow("torch", note="PyTorch eager, fp32")
BENCH_ROWS: dict[str, tuple[BenchRow, Artefact | None]] = {
    TORCH_ROW.name: (TORCH_ROW, None),
    **{a.bench.name: (a.bench, a) for a in ARTEFACTS.values() if a.bench is not None},
}

EXPORT_FORMAT_NAMES = tuple(FORMATS)  # the values of `format=` (dfineseg.config)
BENCH_FORMAT_NAMES = tuple(BENCH_ROWS)  # the values of `bench.formats` (dfineseg.config)


def check_toolchains(formats: Sequence[str], half: bool, int8: bool) -> None:
    """Fail before any work when a toolchain the request needs is missing, or an option lacks its format."""
    asked = set(formats)
    # The hardest toolchain to get is named first (TensorRT needs a GPU machine): the registry's order reversed.
    for fmt in reversed(FORMATS.values()):
        if fmt.name in asked:
            for check in fmt.requires:
                _call(check)
    switched = {"half": half, "int8": int8}
    options = [o for o in OPTIONS.values() if switched[o.name]]
    for option in options:
        for check in option.requires:
            _call(check)
    for option in options:
        if option.format is not None and option.format not in asked:
            from dfineseg.export.errors import ExportError

            raise ExportError(option.refusal)


def planned_artefacts(formats: Sequence[str], half: bool, int8: bool) -> list[str]:
    """The artefact keys an export makes, in the order it makes them."""
    asked = set(formats)
    switched = {"always": True, "half": half, "int8": int8}
    keys = {a.key for a in ARTEFACTS.values() if a.format in asked and switched[a.when]}
    keys.update(k for name in asked for k in FORMATS[name].needs)
    return [k for k in ARTEFACTS if k in keys]
