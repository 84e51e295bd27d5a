"""`export_model(weights, cfg)`: a checkpoint -> every requested artefact, each parity-checked.

Artefacts (in `cfg.export.out`, default the checkpoint's folder; none overwrites another's):
`model.onnx` (format onnx; every other format starts from an FP32 ONNX, which stays an unpublished
intermediate when onnx is not asked for), `model_fp16.onnx` (half=true, or for TensorRT 11),
`openvino/` (FP32 weights), `openvino_fp16/` (half=true), `openvino_int8/` (int8=true), `model.engine`
(+ `model.engine.json`). Each gets a parity report (`<file>.parity.json`, `<folder>/parity.json`), and
`export_summary.json` lists them with time and size on disk.

Replacement (DESIGN "Outputs"): every artefact is made in a staging folder inside `out`, checked there,
and only then renamed over the older one. One that fails its check is kept aside under a name that
says so (`model.failed.onnx`, `openvino.failed/`, ...) and the older good one stays untouched. The
summary is rewritten whatever happens (a parity failure, any other error mid-way): per artefact
passed / failed / not-checked (parity=false) / not-run, never a pass that did not happen; the error
is re-raised after it is written. Nothing is written over a file dfineseg did not write (the ledger
of `dfineseg.utils.outputs`), nor over the checkpoint.

The steps: plan (`make_plan`) -> the FP32 ONNX -> parity data (`load_data`) -> PyTorch's reference ->
for each planned artefact of the registry (`dfineseg.export.formats`): build (its format's module, with
the shared `ExportContext`), check (`_check`), settle (`ExportRun.settle`) -> summary.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfineseg.export.context import ExportContext, Say, open_backend
from dfineseg.export.errors import ExportError
from dfineseg.export.formats import ARTEFACTS, FORMATS, check_toolchains, planned_artefacts
from dfineseg.export.parity import run_parity
from dfineseg.export.parity_data import ParityData, torch_reference
from dfineseg.export.publish import ExportRun, adopt_legacy_export, output_names
from dfineseg.export.tolerances import tolerance_for
from dfineseg.infer.metadata import ModelInfo
from dfineseg.utils.outputs import OutputFolder

if TYPE_CHECKING:  # torch is imported when an export starts, not when this module is
    from dfineseg.export.context import Built
    from dfineseg.export.tolerances import Tolerance
    from dfineseg.model.model_file import ModelFile


@dataclass
class ExportPlan:
    """Everything `export_model` decides from the config and the checkpoint before exporting."""

    weights: Path
    out: Path
    formats: list[str]
    half: bool
    int8: bool
    imgsz: tuple[int, int]
    batch: int
    dynamic_batch: bool
    topk: int
    opset: int
    simplify: bool
    parity: bool
    resize: str
    conf: float
    task: str
    names: list[str]
    category_ids: list[int]
    info: ModelInfo  # the settings above as the metadata every artefact carries
    int8_max_drop: float
    int8_drop_confidence: float
    int8_max_iterations: int | None
    int8_control_seconds: float | None
    workspace_gb: float
    model_size: str | None = None  # the INT8 float-kept set depends on it (export/int8.py float_kept_patterns)


def export_folder(weights: Path, e: Any) -> Path:
    """Where the artefacts go: export.out, or the checkpoint's own folder."""
    return Path(e.out) if e.out else weights.parent


def make_plan(weights: str | Path, cfg: Any, opened: ModelFile) -> ExportPlan:
    e = cfg.export
    weights = Path(weights)
    # Values given on the command line win; otherwise the checkpoint's own (model_file.deploy_info).
    chosen = {key: getattr(section, key) for section, key in ((e, "imgsz"), (e, "topk"), (cfg.eval, "conf"))
              if key in section.model_fields_set and getattr(section, key) is not None}
    info = opened.deploy_info(**chosen)
    return ExportPlan(
        weights=weights,
        out=export_folder(weights, e),
        formats=list(dict.fromkeys(e.formats)),
        half=e.half,
        int8=e.int8,
        imgsz=info.imgsz,
        batch=e.batch,
        dynamic_batch=e.dynamic_batch,
        topk=info.topk,
        opset=e.opset,
        simplify=e.simplify,
        parity=e.parity,
        resize=info.resize,
        conf=info.conf,
        task=info.task,
        names=info.names,
        category_ids=info.category_ids,
        info=info,
        int8_max_drop=e.int8_max_drop,
        int8_drop_confidence=e.int8_drop_confidence,
        int8_max_iterations=e.int8_max_iterations,
        int8_control_seconds=e.int8_control_seconds,
        workspace_gb=e.workspace_gb,
        model_size=opened.config.model.size,
    )


# ------------------------------------------------------------------------------------------ data
def _dataset_path(cfg: Any, opened: ModelFile) -> str | None:
    if cfg.data.path:
        return cfg.data.path
    trained_on = opened.config.data.path
    return trained_on if trained_on and Path(trained_on).exists() else None


def _spread(items: list[Any], n: int) -> list[Any]:
    """n items spread evenly over the list (deterministic, not just the first n)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def load_data(cfg: Any, opened: ModelFile, plan: ExportPlan, say: Say) -> tuple[ParityData, list[np.ndarray]]:
    """Validation images with ground truth (or generated images) for parity, and calibration images."""
    path = _dataset_path(cfg, opened)
    n_raw = cfg.export.parity_images
    calib_n = cfg.export.int8_calib_size

    def parity_data(images: list[np.ndarray], gts: list[Any] | None, source: str) -> ParityData:
        return ParityData(images, gts, source, plan.imgsz, plan.resize, plan.task, plan.conf, cfg.eval.iou, n_raw,
                          nms_iou=cfg.eval.nms_iou)

    if path:
        from dfineseg.data import load_index, read_image
        from dfineseg.evaluate import ground_truth_from_record

        index = load_index(path, cfg.eval.split, allow_outside_root=cfg.data.allow_outside_root)
        if not index.images:
            raise ExportError(f"{path}: split '{cfg.eval.split}' has no images to check parity on (set eval.split=...)")
        images = [read_image(r.file) for r in index.images]
        gts = [ground_truth_from_record(r, plan.task) for r in index.images]
        calib: list[np.ndarray] = []
        if plan.int8:
            try:
                train = load_index(path, cfg.data.train_split, allow_outside_root=cfg.data.allow_outside_root)
                calib = [read_image(r.file) for r in _spread(list(train.images), calib_n)]
            except Exception as exc:  # noqa: BLE001 - a dataset without a train split calibrates on val
                say(f"INT8 calibration: no usable '{cfg.data.train_split}' split ({exc}); calibrating on '{cfg.eval.split}'")
            if not calib:
                calib = _spread(images, calib_n)
        source = f"{path} split={cfg.eval.split} ({len(images)} images)"
        return parity_data(images, gts, source), calib
    from dfineseg.data.synthetic import synth_image

    rng = np.random.default_rng(0)
    images = [synth_image(rng)[0] for _ in range(max(n_raw, 2))]
    calib = [synth_image(rng)[0] for _ in range(calib_n)] if plan.int8 else []
    source = f"{len(images)} generated images (no dataset: data=... not given, F1 not checked)"
    say(f"parity: no dataset found, using {source}")
    return parity_data(images, None, source), calib


def check_finite_weights(opened: ModelFile) -> None:
    """Refuse a checkpoint whose weights hold NaN/Inf: its outputs are NaN and every parity check would fail.
    The same rule the trainer applies before it saves (`nonfinite_weights`: the anchor caches excepted)."""
    import torch

    from dfineseg.model.checkpoint import nonfinite_weights

    state = opened.model.state_dict()
    bad = nonfinite_weights(state)
    if bad:
        name, tensor = bad[0], state[bad[0]]
        which = "EMA weights" if opened.ema else "weights"
        raise ExportError(
            f"{opened.path}: the checkpoint's {which} are not finite: '{name}' holds {int((~torch.isfinite(tensor)).sum())} "
            f"NaN/Inf value(s) of {tensor.numel()}; training diverged or the file was damaged. Export an earlier "
            "checkpoint (e.g. last.pt vs best.pt, or one saved before the loss went NaN), or retrain with a lower lr"
        )


# ------------------------------------------------------------------------------------------ driver
def _print(msg: str) -> None:
    print(msg, flush=True)


def export_model(weights: str | Path, cfg: Any, say: Say | None = _print) -> dict[str, Path]:
    """Export the checkpoint `weights` to every format in `cfg.export`; returns {artefact key: path}.

    Keys: onnx, onnx_fp16, openvino, openvino_fp16, openvino_int8, tensorrt (only those made), and
    `summary` (export_summary.json). Raises ExportError (ParityError on a failed parity check, naming
    the check and by how much; ExportBackendUnavailable when TensorRT/GPU/OpenVINO are missing), after
    writing the summary; a failed artefact never replaces an earlier good one.
    """
    say = say or (lambda _msg: None)
    weights = Path(weights)
    if not weights.is_file():
        raise ExportError(f"weights file not found: {weights} (pass weights=path/to/best.pt)")
    e = cfg.export
    formats = list(dict.fromkeys(e.formats))
    check_toolchains(formats, e.half, e.int8)  # fail before any work when a requested toolchain is missing

    # Refuse before any work when an output would replace a file dfineseg did not write.
    folder = OutputFolder(export_folder(weights, e), command="export", protect=[weights])
    keys = planned_artefacts(formats, e.half, e.int8)
    if not keys:
        raise ExportError(f"nothing to export: pass format= one or more of {', '.join(FORMATS)}")
    if e.gather_sampler:
        say("export.gather_sampler=true has no effect: every export's deformable attention now samples by gathering "
            "rows of the token memory, without GridSample (MSDeformableAttention._gather_rows)")
    adopted = adopt_legacy_export(folder)
    if adopted:
        say(f"{folder.root}: written by an earlier dfineseg (no output ledger); its export files are adopted: "
            + ", ".join(adopted))
    folder.check_all(output_names(keys))
    run = ExportRun(keys, folder, say)
    base: dict[str, Any] = {"weights": str(weights), "imgsz": list(e.imgsz) if e.imgsz else None, "batch": e.batch,
                            "dynamic_batch": e.dynamic_batch, "topk": e.topk,
                            "parity": e.parity}
    error: BaseException | None = None
    try:
        run.stage = folder.staging()
        from dfineseg.model.model_file import load_model_file

        opened = load_model_file(weights)
        check_finite_weights(opened)
        plan = make_plan(weights, cfg, opened)
        base["imgsz"] = list(plan.imgsz)
        base["topk"] = plan.topk
        with tempfile.TemporaryDirectory(prefix="dfineseg-parity-") as tmp:
            ctx = ExportContext(plan, run, say, Path(tmp), plan.info.to_metadata())
            _export_all(ctx, cfg, opened)
    except OSError as exc:
        error = ExportError(
            f"export: {exc.filename or 'a file'}: {exc.strerror or exc}; if it is in the output folder "
            f"{folder.root}, pass out= a folder you can write to (and check the free disk space)"
        )
        run.fail_current(error)
        raise error from None
    except BaseException as exc:
        error = exc
        run.fail_current(exc)
        raise
    finally:
        try:
            summary_path = run.write_summary(base, error)
        except Exception:
            if error is None:
                raise
        finally:
            if run.stage is not None:
                shutil.rmtree(run.stage, ignore_errors=True)
    result = {k: r.path for k, r in run.records.items()}
    result["summary"] = summary_path
    return result


def export(cfg: Any, say: Say | None = _print) -> dict[str, Path]:
    """`dfineseg export`: the checkpoint comes from `cfg.export.weights`."""
    if not cfg.export.weights:
        raise ExportError("no checkpoint to export: pass weights=path/to/best.pt")
    return export_model(cfg.export.weights, cfg, say)


def _export_all(ctx: ExportContext, cfg: Any, opened: ModelFile) -> None:
    """The FP32 ONNX, the parity data and PyTorch's reference, then each planned artefact: build, check, settle."""
    from dfineseg.export.onnx_export import RawOutputs, export_source, export_twin
    from dfineseg.model.runner import deploy_module

    plan, run = ctx.plan, ctx.run
    from dfineseg.model.dinov2 import merge_lora

    # A DINOv2 backbone's LoRA updates are folded into its weights first: the graph (and the PyTorch reference
    # it is checked against) holds no LoRA operations.
    merged = merge_lora(opened.model)
    if merged:
        ctx.say(f"LoRA: merged {merged} adapters into the DINOv2 weights")
    deploy = deploy_module(opened.model, plan.topk)
    # Every format starts from the FP32 ONNX: an error making it (or loading the parity data, or computing
    # the reference) is the failure of the first artefact.
    run.start(run.keys[0])
    ctx.source, onnx_info = export_source(ctx, deploy)
    ctx.made["onnx"] = ctx.source.path
    if plan.parity or plan.int8:
        ctx.data, ctx.calib = load_data(cfg, opened, plan, ctx.say)
    if plan.parity:
        assert ctx.data is not None
        ctx.twin = export_twin(ctx, opened.model)
        ctx.reference = torch_reference(deploy, RawOutputs(opened.model), ctx.data, onnx_info.output_names)
        f1_txt = f", F1 {ctx.reference.f1['f1']:.4f}" if ctx.reference.f1 else ""
        ctx.say(f"PyTorch reference: {len(ctx.data.images)} images in {ctx.reference.seconds:.1f} s{f1_txt}")

    for key in run.keys:
        artefact = ARTEFACTS[key]
        built = artefact.make(ctx)
        _check(ctx, built, tolerance_for(artefact.tolerance, plan.int8_max_drop, plan.int8_drop_confidence))
        try:
            # Promoted over the older one, or kept aside as failed (and ParityError raised).
            ctx.made[key] = run.settle(built.record)
        finally:
            if built.settled is not None:
                built.settled(built.record)


def _check(ctx: ExportContext, built: Built, tol: Tolerance) -> None:
    """Open the staged artefact the way users do (a file that does not load fails here, parity or not), and
    with parity on compare it with PyTorch; the verdict is `ExportRun.settle`'s to act on."""
    forward, fixed_batch, runtime = open_backend(built.opens, **built.options)
    if not ctx.plan.parity:
        return
    assert ctx.data is not None and ctx.reference is not None
    rec = built.record
    # A runtime with a precision choice (OpenVINO) is checked at a pinned precision; users run its default too.
    default_options = {k: v for k, v in built.options.items() if k != "precision"}
    open_default = (lambda: open_backend(built.opens, **default_options)) if "precision" in built.options else None
    rec.parity = run_parity(rec.path, rec.precision, forward, fixed_batch, ctx.data, ctx.reference, tol, built.twin,
                            runtime, raise_on_failure=False, open_device_default=open_default)
    ctx.say(f"  parity {rec.key}: " + ", ".join(c.brief() for c in rec.parity.checks))
