"""torch DeployModel -> one self-contained, simplified ONNX file with native LayerNormalization."""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from dfineseg.export.context import Built, ExportContext, ort_forward
from dfineseg.export.errors import ExportError
from dfineseg.export.meta import with_precision, write_onnx_metadata
from dfineseg.export.publish import ArtefactRecord, artefact_size
from dfineseg.infer.graph import DETECTION_OUTPUTS, INPUT_NAME, MASK_OUTPUTS, OUTPUT_NAMES, RAW_NAMES
from dfineseg.utils.io import atomic_write_bytes

if TYPE_CHECKING:
    from dfineseg.export.formats import Artefact

log = logging.getLogger(__name__)


@dataclass
class OnnxExportInfo:
    path: Path
    opset: int
    simplified: bool
    simplify_error: str | None
    dynamic_batch: bool
    batch: int
    imgsz: tuple[int, int]
    output_names: tuple[str, ...]
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)


class RawOutputs(nn.Module):
    """The pre-top-K twin of DeployModel (parity only): every query's class logits and cxcywh box."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pan, _ = self.model.features(images)
        out, _ = self.model.decoder(pan)
        return out["pred_logits"], out["pred_boxes"]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def decomposed_layernorms(model: onnx.ModelProto) -> int:
    """Count ReduceMean -> Sub -> Pow chains: the opset<17 spelling of LayerNorm that overflows in FP16."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        for sub in consumers.get(node.output[0], []):
            if sub.op_type == "Sub" and any(c.op_type == "Pow" for c in consumers.get(sub.output[0], [])):
                found += 1
    return found


def _has_layernorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.LayerNorm) for m in module.modules())


def _num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, tuple | list) or len(out) not in (len(DETECTION_OUTPUTS), len(OUTPUT_NAMES)):
        raise ExportError(
            f"the deploy model returned {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}; "
            f"expected ({', '.join(DETECTION_OUTPUTS)}[, {', '.join(MASK_OUTPUTS)}])"
        )
    return len(out)


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    try:
        import onnxslim
    except ImportError as exc:  # optional extra: keep the plain graph, but say why
        return model, f"onnxslim is not installed ({exc})"
    try:
        slim = onnxslim.slim(model)
        if slim is None:
            return model, "onnxslim returned no model"
        onnx.checker.check_model(slim)
        return slim, None
    except Exception as exc:  # noqa: BLE001 - any simplifier failure leaves a valid, unsimplified graph
        return model, f"{type(exc).__name__}: {exc}"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    imgsz: tuple[int, int],
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = 19,
    simplify: bool = True,
    metadata: dict[str, str] | None = None,
    output_names: tuple[str, ...] | None = None,
) -> OnnxExportInfo:
    """Trace `model` (a DeployModel in eval mode) into `path` (a single .onnx file, no external data)."""
    if opset < 17:
        raise ExportError(f"export.opset={opset}: LayerNormalization needs opset >= 17 (use 17..{onnx.defs.onnx_opset_version()})")
    h, w = int(imgsz[0]), int(imgsz[1])
    if h % 32 or w % 32:
        raise ExportError(f"imgsz=[{h}, {w}]: both sides must be multiples of 32")
    path = Path(path)
    t0 = time.perf_counter()
    model = model.eval()
    # A dynamic graph is traced with 2 images so that nothing gets specialised to a batch of one.
    example = torch.rand(max(batch, 2) if dynamic_batch else batch, 3, h, w)
    names = tuple(output_names) if output_names else OUTPUT_NAMES[: _num_outputs(model, example)]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that writes native LayerNormalization
        # at opset 17 and a single file; its warnings say only that.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    simplify_error = None
    simplified = False
    if simplify:
        proto, simplify_error = _simplify(proto)
        simplified = simplify_error is None
        if simplify_error:
            log.warning("onnxslim failed, keeping the unsimplified graph: %s", simplify_error)

    counts = op_counts(proto)
    # (A LayerNorm over constants is folded away, so only the decomposed pattern is an error.)
    if _has_layernorm(model) and decomposed_layernorms(proto):
        raise ExportError(
            f"{path}: LayerNorm was decomposed into ReduceMean/Sub/Pow (opset {opset}); "
            "TensorRT FP16 overflows on that form: export with opset >= 17"
        )
    if counts.get("GridSample"):
        # The deploy graph samples by gathering rows (MSDeformableAttention._gather_rows): GridSample here means
        # the training form was traced, which TensorRT mis-computes (dfine-facts section 8) and OpenVINO runs slowly.
        raise ExportError(
            f"{path}: the traced graph has {counts['GridSample']} GridSample node(s): the model was not traced in "
            "eval mode, or a module samples through grid_sample (export traces DeployModel.eval())"
        )
    if metadata:
        write_onnx_metadata(proto, metadata)
    data = proto.SerializeToString()
    # Serialised in memory and written whole: the file never refers to external .onnx.data.
    atomic_write_bytes(path, data)
    return OnnxExportInfo(
        path=path,
        opset=opset,
        simplified=simplified,
        simplify_error=simplify_error,
        dynamic_batch=dynamic_batch,
        batch=batch,
        imgsz=(h, w),
        output_names=tuple(names),
        seconds=time.perf_counter() - t0,
        op_counts=counts,
    )


# ------------------------------------------------------------------------------------------ export steps
def export_source(ctx: ExportContext, deploy: nn.Module) -> tuple[ArtefactRecord, OnnxExportInfo]:
    """The FP32 ONNX every format starts from, staged as the onnx artefact (published only with format=onnx)."""
    plan = ctx.plan
    path = ctx.run.staged("onnx")
    info = export_onnx(deploy, path, metadata=ctx.metadata, imgsz=plan.imgsz, batch=plan.batch,
                       dynamic_batch=plan.dynamic_batch, opset=plan.opset, simplify=plan.simplify)
    note = "" if info.simplified else f" (not simplified: {info.simplify_error or 'simplify=false'})"
    ctx.say(f"ONNX: exported ({artefact_size(path) / 1e6:.1f} MB, {info.seconds:.1f} s, opset {plan.opset}){note}")
    record = ArtefactRecord("onnx", path, "fp32", info.seconds, extra={
        "simplified": info.simplified, "simplify_error": info.simplify_error, "op_counts": info.op_counts})
    return record, info


def export_twin(ctx: ExportContext, model: nn.Module) -> Path:
    """The pre-top-K twin of the FP32 ONNX (`RawOutputs`), for the raw check; each format converts it as it
    converts the artefact. Unsimplified: the twin only has to compute the same numbers, and simplifying it
    would double the time."""
    plan = ctx.plan
    path = ctx.scratch / "raw.onnx"
    export_onnx(RawOutputs(model), path, imgsz=plan.imgsz, batch=1, dynamic_batch=True, opset=plan.opset,
                simplify=False, output_names=RAW_NAMES)
    return path


def build_onnx(ctx: ExportContext, artefact: Artefact) -> Built:
    """format=onnx: the FP32 ONNX `export_source` made first, checked as it is."""
    assert ctx.source is not None
    return Built(ctx.source, ctx.source.path, ort_forward(ctx.twin) if ctx.twin is not None else None)


def write_fp16_onnx(src: Path, dst: Path, metadata: dict[str, str]) -> float:
    """`src` converted to FP16 (`dfineseg.export.fp16`) into `dst`; returns the seconds it took."""
    from dfineseg.export.fp16 import convert_to_fp16

    t0 = time.perf_counter()
    fp16 = convert_to_fp16(onnx.load(str(src)))
    if metadata:
        write_onnx_metadata(fp16, metadata)
    atomic_write_bytes(dst, fp16.SerializeToString())
    return time.perf_counter() - t0


def build_fp16_onnx(ctx: ExportContext, artefact: Artefact) -> Built:
    """half=true, and TensorRT 11's input: the FP32 ONNX converted to FP16, its twin converted alike."""
    path = ctx.run.start(artefact.key)
    seconds = write_fp16_onnx(ctx.made["onnx"], path, with_precision(ctx.metadata, "fp16"))
    ctx.say(f"ONNX FP16: converted ({artefact_size(path) / 1e6:.1f} MB, {seconds:.1f} s; float32 inputs/outputs, "
            "LayerNorm/Softmax in float32)")
    twin = None
    if ctx.twin is not None:
        write_fp16_onnx(ctx.twin, ctx.scratch / "raw_fp16.onnx", {})
        twin = ort_forward(ctx.scratch / "raw_fp16.onnx")
    return Built(ArtefactRecord(artefact.key, path, artefact.precision, seconds), path, twin)
