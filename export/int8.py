"""OpenVINO INT8 through NNCF, with accuracy control on the paper's F1 when a validation set exists.

The precision-sensitive tail of D-FINE stays in float from the start (ignored scope): the softmax over
the distribution bins and its integral (a MatMul with the bin positions, which INT8 would snap to a
few levels), the box heads, the decoder's own arithmetic on boxes (reference boxes, inverse sigmoid, box
decoding from the distributions, the next layer's references), the positional-query MLP that reads those
boxes, the localisation-quality head, and top-K. Without the box arithmetic and the positional MLP, NNCF
put 256-level FakeQuantize nodes on the decoded boxes between layers (float-kept operations get quantised
outputs when their consumer is quantised): S lost 0.020 F1 on 400 held-out images, 0.0075 with them
(docs/BENCHMARKS.md "INT8 sensitivity by module"). Accuracy
control (`nncf.quantize_with_accuracy_control`) then reverts further layers until the F1 drop is at
most `max_drop`. Without ground truth, plain `nncf.quantize` on the calibration images is used and
the result says that accuracy was not controlled.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfineseg.export.context import Built, ExportContext
from dfineseg.export.errors import ExportBackendUnavailable, ExportError
from dfineseg.export.meta import write_openvino_metadata
from dfineseg.export.openvino_export import PARITY_PRECISION_HINT, compiled_forward, import_openvino
from dfineseg.export.parity_checks import DropLimit, drop_limit
from dfineseg.export.parity_data import ParityData, detections_for, outcome_of
from dfineseg.export.publish import ArtefactRecord, artefact_size
from dfineseg.infer.batching import chunks, pad_batch
from dfineseg.infer.preprocess import preprocess
from dfineseg.utils.io import atomic_write_bytes

if TYPE_CHECKING:
    from dfineseg.export.formats import Artefact

log = logging.getLogger(__name__)

# Regular expressions over OpenVINO operation names (they carry the torch module path of the export).
PRECISION_SENSITIVE = (
    r".*/decoder/Softmax(_\d+)?(/.*|_output.*)?$",  # distribution softmax
    r".*/decoder/MatMul(_\d+)?(/.*|_output.*)?$",  # its integral over the bin positions
    # Every operation of the decoder's own forward (op-type names, capitalised; its submodules are lower
    # case): the box arithmetic, which includes the two above, kept as their own patterns so a rename fails.
    r".*/decoder/[A-Z][^/]*(/.*)?$",
    r".*/decoder/query_pos_head.*",  # positional queries from the boxes
    r".*/decoder/(dec|pre|enc)_bbox_head.*",  # box regression heads
    r".*/decoder/lqe_layers.*",  # localisation-quality estimate (top-k of the distribution)
    r".*TopK.*",
    # The deformable attention's sampling (MSDeformableAttention._gather_rows: the corner rows of the memory and
    # their weighted sum) but not its two linear layers (lower case): quantised, the sampled values cost S 0.24 F1.
    r".*/cross_attn/[A-Z][^/]*(/.*)?$",
)
# Kept in float only from S up, by measurement (docs/BENCHMARKS.md, session 12): quantising the box heads and the
# positional-query MLP cost N nothing on 400 held-out images (drop -0.002 against 0.001 with them in float) and
# saved it ~0.5 ms of 23 at 640; S lost 0.007 more with them quantised (0.010 in all).
FLOAT_FROM_S_UP = (r".*/decoder/query_pos_head.*", r".*/decoder/(dec|pre|enc)_bbox_head.*")
SMALL_SIZES = ("tiny", "n")


def float_kept_patterns(size: str | None) -> tuple[str, ...]:
    """The float-kept patterns for a model size (an unknown size keeps the full set)."""
    if size in SMALL_SIZES:
        return tuple(p for p in PRECISION_SENSITIVE if p not in FLOAT_FROM_S_UP)
    return PRECISION_SENSITIVE


@dataclass
class Int8Result:
    xml: Path
    accuracy_controlled: bool
    note: str
    float_f1: float | None
    int8_f1: float | None
    f1_drop: float | None
    max_drop: float
    calibration_images: int
    validation_images: int
    # the limit the drop was judged by: max_drop + z x its sampling error over the validation images
    # (export.int8_drop_confidence; `parity_checks.drop_limit`), and that error
    drop_limit: float | None = None
    drop_se: float | None = None
    drop_confidence: float | None = None
    ignored_operations: list[str] = field(default_factory=list)
    precision_hint: str = PARITY_PRECISION_HINT
    seconds: float = 0.0
    control_stopped: bool = False  # accuracy control ran out of export.int8_control_seconds

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["xml"] = str(self.xml)
        return d


def import_nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:
        raise ExportBackendUnavailable(f'INT8 export needs NNCF: pip install "dfineseg[quantize]" ({exc})') from None
    return nncf


def sensitive_operations(model: Any, patterns: Sequence[str] = PRECISION_SENSITIVE) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return sorted(op.get_friendly_name() for op in model.get_ops() if any(c.match(op.get_friendly_name()) for c in compiled))


def unmatched_patterns(op_names: Sequence[str], patterns: Sequence[str] = PRECISION_SENSITIVE) -> list[str]:
    """The float-kept patterns that match no operation (a renamed model or exporter): said loudly, since
    what they should keep in float would be quantised."""
    return [p for p in patterns if not any(re.match(p, name) for name in op_names)]


def _static_batch(model: Any) -> int | None:
    dim = model.inputs[0].get_partial_shape()[0]
    return dim.get_length() if dim.is_static else None


def quantize_int8(
    fp32_xml: Path,
    out_dir: Path,
    *,
    calibration_images: Sequence[np.ndarray],
    data: ParityData,
    max_drop: float,
    metadata: dict[str, str],
    max_iterations: int | None = None,
    control_seconds: float | None = None,
    patterns: Sequence[str] = PRECISION_SENSITIVE,
    drop_confidence: float | None = None,
) -> Int8Result:
    """Quantise the FP32 IR at `fp32_xml` into `out_dir/model.xml`. When `data` has ground truth, the INT8
    model's F1 drop is checked against `max_drop` widened by its sampling noise at one-sided `drop_confidence`
    (None: the measured drop against `max_drop` as it is), and only a model that misses it goes through NNCF's
    accuracy control, for at most `control_seconds` (None: no limit)."""
    ov = import_openvino()
    nncf = import_nncf()

    t0 = time.perf_counter()
    core = ov.Core()
    model = core.read_model(str(fp32_xml))
    fixed = _static_batch(model)
    step = fixed or 1
    imgsz, resize = data.imgsz, data.resize

    def to_input(chunk: list[np.ndarray]) -> np.ndarray:
        return pad_batch(preprocess(chunk, imgsz, resize)[0], step)

    calibration = nncf.Dataset(list(chunks(calibration_images, step)), to_input)
    ignored = sensitive_operations(model, patterns)
    missing = unmatched_patterns([op.get_friendly_name() for op in model.get_ops()], patterns)
    if missing:
        log.warning("INT8: %d float-kept pattern(s) match no operation of %s, so those parts get quantised: %s",
                    len(missing), fp32_xml, ", ".join(missing))
    ignored_scope = nncf.IgnoredScope(names=ignored, validate=False) if ignored else None
    # NNCF logs one INFO line per float-kept operation (85 for N) to the console; the list is in
    # int8_accuracy.json (`ignored_operations`), so only its warnings are shown.
    nncf.set_log_level(logging.WARNING)

    float_f1 = float_counts = None
    controlled = data.ground_truth is not None
    note = ""
    if controlled:
        float_f1, float_counts = _f1_of_model(model, data)
        if float_f1 <= 0.0:
            controlled = False
            note = (
                "accuracy was NOT controlled: the float model's F1 on the validation set is 0, and "
                "accuracy control needs a metric that is not 0 for the float model"
            )
    else:
        note = "accuracy was NOT controlled: no validation set with ground truth (calibrated on generated images)"

    try:
        quantized = nncf.quantize(model, calibration, subset_size=max(1, len(calibration_images)),
                                  ignored_scope=ignored_scope)
    except Exception as exc:
        raise ExportError(f"{fp32_xml}: NNCF INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    int8_f1, int8_counts = _f1_of_model(quantized, data) if data.ground_truth is not None else (None, None)

    def judged() -> DropLimit:
        assert float_counts is not None and int8_counts is not None
        return drop_limit(max_drop, 0.5 if drop_confidence is None else drop_confidence, float_counts, int8_counts)

    stopped = False
    limit: DropLimit | None = None
    if controlled:
        assert float_f1 is not None and int8_f1 is not None
        limit = judged()
        if float_f1 - int8_f1 <= limit.limit:
            note = (f"accuracy checked on {len(data.images)} validation images: the first INT8 model is within "
                    f"the max F1 drop ({limit.describe()})")
        else:
            # The fallback: NNCF ranks the quantised operations by reverting each alone and keeps the fewest
            # in float that bring the drop within the limit judged here (the first model's noise allowance
            # included). That costs a validation per operation (minutes for N, more than 20 for S at 640), so
            # it is bounded by `control_seconds`; at the bound the first INT8 model is kept and the report says so.
            first_drop, target = float_f1 - int8_f1, limit.limit
            restored, spent = _accuracy_control(
                nncf, model, calibration, data, step, to_input, target, len(calibration_images),
                ignored_scope, max_iterations, control_seconds, fp32_xml)
            if restored is None:
                stopped = True
                note = (f"accuracy control STOPPED after {spent:.0f} s (export.int8_control_seconds="
                        f"{control_seconds:g}): the first INT8 model is kept, F1 drop {first_drop:.4f} on "
                        f"{len(data.images)} validation images")
            else:
                quantized = restored
                int8_f1, int8_counts = _f1_of_model(quantized, data)
                limit = judged()
                note = (f"accuracy controlled by NNCF on {len(data.images)} validation images (max F1 drop "
                        f"{max_drop}, with the noise allowance {target:.4f}): the first INT8 model "
                        f"dropped {first_drop:.4f}, NNCF reverted operations to float in {spent:.0f} s")

    if controlled and limit is not None and float_f1 is not None and int8_f1 is not None \
            and float_f1 - int8_f1 > limit.limit:
        note += (
            f"; the target was NOT reached: F1 drop {float_f1 - int8_f1:.4f} ({limit.describe()}) "
            "(allow more with export.int8_control_seconds or export.int8_max_iterations, or a larger "
            "export.int8_max_drop)"
        )
    write_openvino_metadata(quantized, {**metadata, "precision": "int8"})
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    result = Int8Result(
        xml=xml,
        accuracy_controlled=controlled,
        note=note,
        float_f1=float_f1,
        int8_f1=int8_f1,
        f1_drop=(float_f1 - int8_f1) if float_f1 is not None and int8_f1 is not None else None,
        max_drop=max_drop,
        calibration_images=len(calibration_images),
        validation_images=len(data.images) if data.ground_truth is not None else 0,
        drop_limit=limit.limit if limit is not None else None,
        drop_se=limit.se if limit is not None else None,
        drop_confidence=limit.confidence if limit is not None else None,
        ignored_operations=ignored,
        seconds=time.perf_counter() - t0,
        control_stopped=stopped,
    )
    atomic_write_bytes(out_dir / "int8_accuracy.json", json.dumps(result.to_dict(), indent=2).encode())
    return result


class _ControlTimeUp(Exception):
    """Raised from the validation function when accuracy control has used its time."""


def _accuracy_control(nncf: Any, model: Any, calibration: Any, data: ParityData, step: int, to_input: Any,
                      max_drop: float, subset_size: int, ignored_scope: Any, max_iterations: int | None,
                      control_seconds: float | None, fp32_xml: Path) -> tuple[Any | None, float]:
    """NNCF's accuracy-controlled quantisation, stopped at `control_seconds`: (model or None, seconds)."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    items = list(zip(chunks(data.images, step), chunks(data.ground_truth, step)))
    validation = nncf.Dataset(items, lambda item: to_input(item[0]))
    t0 = time.perf_counter()

    def validate(compiled: Any, batch_items: Any) -> tuple[float, list[float]]:
        if control_seconds is not None and time.perf_counter() - t0 > control_seconds:
            raise _ControlTimeUp
        forward = compiled_forward(compiled)
        per_item: list[float] = []
        dets_all: list[Any] = []
        gts_all: list[Any] = []
        for images, gts in batch_items:
            # The parity code's detections (same preprocess, postprocess and NMS as its F1 check).
            dets = detections_for(forward, data, step, images=list(images))
            dets_all.extend(dets)
            gts_all.extend(gts)
            per_item.append(_f1(dets, list(gts), data))
        return _f1(dets_all, gts_all, data), per_item

    defaults = AdvancedAccuracyRestorerParameters()
    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=max_iterations if max_iterations is not None else defaults.max_num_iterations)
    try:
        restored = nncf.quantize_with_accuracy_control(
            model, calibration_dataset=calibration, validation_dataset=validation, validation_fn=validate,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=subset_size,
            ignored_scope=ignored_scope, advanced_accuracy_restorer_parameters=restorer)
    except _ControlTimeUp:
        return None, time.perf_counter() - t0
    except Exception as exc:
        if isinstance(exc.__cause__ or exc.__context__, _ControlTimeUp):  # re-raised by a worker pool
            return None, time.perf_counter() - t0
        raise ExportError(f"{fp32_xml}: NNCF accuracy control failed: {type(exc).__name__}: {exc}") from exc
    return restored, time.perf_counter() - t0


def _f1(dets: Sequence[Any], gts: Sequence[Any], data: ParityData) -> float:
    from dfineseg.infer.metrics import paper_metrics

    return float(paper_metrics(list(dets), list(gts), data.task, conf=data.conf, iou_thr=data.iou_thr)["f1"])


def _f1_of_model(model: Any, data: ParityData) -> tuple[float, np.ndarray | None]:
    """The model's F1 on the validation images and each image's tp, fp, fn (for the drop's sampling error)."""
    from dfineseg.export.openvino_export import compile_openvino

    compiled = compile_openvino(model, PARITY_PRECISION_HINT)
    fixed = _static_batch(model)
    outcome = outcome_of(detections_for(compiled_forward(compiled), data, fixed), data)
    return (float(outcome.summary()["f1"]) if outcome else 0.0), (outcome.image_counts if outcome else None)


def build_int8(ctx: ExportContext, artefact: Artefact) -> Built:
    """int8=true: the published FP32 IR quantised by NNCF (accuracy-controlled on the parity data's F1 when it
    has ground truth); checked by its F1 drop at f32 compute precision for the float parts."""
    plan = ctx.plan
    assert ctx.data is not None  # loaded whenever int8 is on
    fp32_xml = ctx.made["openvino"] / "model.xml"
    out_dir = ctx.run.start(artefact.key)
    ctx.say(f"OpenVINO INT8: NNCF, {len(ctx.calib)} calibration images, max F1 drop {plan.int8_max_drop} plus its "
            f"sampling noise at {plan.int8_drop_confidence:g} confidence "
            "(if the first INT8 model drops more, NNCF ranks the quantised layers, for at most "
            f"{plan.int8_control_seconds if plan.int8_control_seconds is not None else 'unlimited'} s)")
    res = quantize_int8(
        fp32_xml, out_dir, calibration_images=ctx.calib, data=ctx.data, max_drop=plan.int8_max_drop,
        metadata=ctx.metadata, max_iterations=plan.int8_max_iterations,
        control_seconds=plan.int8_control_seconds, patterns=float_kept_patterns(plan.model_size),
        drop_confidence=plan.int8_drop_confidence,
    )
    f1_txt = (
        f"F1 float {res.float_f1:.4f} -> INT8 {res.int8_f1:.4f} (drop {res.f1_drop:+.4f}, max {res.max_drop}"
        + (f" + sampling noise {res.drop_limit - res.max_drop:.4f} = {res.drop_limit:.4f})"
           if res.drop_limit is not None else ")")
        if res.f1_drop is not None else "F1 not measured"
    )
    ctx.say(f"OpenVINO INT8: quantised ({artefact_size(out_dir) / 1e6:.1f} MB, {res.seconds:.1f} s); {f1_txt}; {res.note}")
    record = ArtefactRecord(artefact.key, out_dir, artefact.precision, res.seconds, extra={"int8": res.to_dict()})

    def settled(rec: ArtefactRecord) -> None:
        # The accuracy report names the IR where it now lives (promoted, or kept aside as failed).
        if rec.path != out_dir and rec.path.is_dir():
            res.xml = rec.path / res.xml.name
            rec.extra["int8"] = res.to_dict()
            atomic_write_bytes(rec.path / "int8_accuracy.json", json.dumps(res.to_dict(), indent=2).encode())

    return Built(record, res.xml, None, {"precision": PARITY_PRECISION_HINT}, settled)
