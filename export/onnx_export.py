"""torch DeployModel -> one self-contained, simplified ONNX file with native LayerNormalization."""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from dfineseg.export.errors import ExportError
from dfineseg.export.gather_sampler import use_gather_sampler
from dfineseg.export.meta import write_onnx_metadata
from dfineseg.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "labels", "boxes", "mask_logits")


@dataclass
class OnnxExportInfo:
    path: Path
    opset: int
    simplified: bool
    simplify_error: str | None
    gather_sampler: bool
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
    if not isinstance(out, tuple | list) or len(out) not in (3, 4):
        raise ExportError(
            f"the deploy model returned {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}; "
            "expected (scores, labels, boxes[, mask_logits])"
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
    gather_sampler: bool = False,
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
    with use_gather_sampler(gather_sampler):
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
    if gather_sampler and counts.get("GridSample"):
        raise ExportError(
            f"{path}: export.gather_sampler=true but the graph still has {counts['GridSample']} GridSample "
            "node(s): the model's deformable attention does not sample through a patchable grid_sample"
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
        gather_sampler=gather_sampler,
        dynamic_batch=dynamic_batch,
        batch=batch,
        imgsz=(h, w),
        output_names=tuple(names),
        seconds=time.perf_counter() - t0,
        op_counts=counts,
    )
