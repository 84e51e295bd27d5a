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
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.export.errors import ExportError
from dfineseg.export.meta import build_metadata, with_precision
from dfineseg.export.parity import (
    RAW_NAMES,
    TOLERANCES,
    ParityData,
    Reference,
    int8_tolerance,
    run_parity,
    torch_reference,
)
from dfineseg.export.publish import (
    ArtefactRecord,
    ExportRun,
    adopt_legacy_export,
    artefact_size,
    output_names,
    planned_artefacts,
)
from dfineseg.utils.io import atomic_write_bytes
from dfineseg.utils.outputs import OutputFolder

Say = Callable[[str], None]


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
    gather_sampler: bool
    parity: bool
    resize: str
    conf: float
    task: str
    names: list[str]
    category_ids: list[int]


def _conf(cfg: Any, info: dict[str, Any]) -> float:
    # A threshold given on the command line wins; otherwise the one the checkpoint was validated with.
    if "conf" in cfg.eval.model_fields_set:
        return float(cfg.eval.conf)
    return float(info.get("conf", cfg.eval.conf))


def export_folder(weights: Path, e: Any) -> Path:
    """Where the artefacts go: export.out, or the checkpoint's own folder."""
    return Path(e.out) if e.out else weights.parent


def make_plan(weights: str | Path, cfg: Any, info: dict[str, Any]) -> ExportPlan:
    e = cfg.export
    weights = Path(weights)
    return ExportPlan(
        weights=weights,
        out=export_folder(weights, e),
        formats=list(dict.fromkeys(e.formats)),
        half=e.half,
        int8=e.int8,
        imgsz=tuple(e.imgsz) if e.imgsz else tuple(info.get("imgsz") or cfg.data.imgsz),
        batch=e.batch,
        dynamic_batch=e.dynamic_batch,
        topk=e.topk,
        opset=e.opset,
        simplify=e.simplify,
        gather_sampler=e.gather_sampler,
        parity=e.parity,
        resize=str(info.get("resize") or cfg.data.resize),
        conf=_conf(cfg, info),
        task=str(info.get("task") or cfg.model.task),
        names=list(info["names"]),
        category_ids=list(info.get("category_ids") or range(len(info["names"]))),
    )


# ------------------------------------------------------------------------------------------ data
def _dataset_path(cfg: Any, info: dict[str, Any]) -> str | None:
    if cfg.data.path:
        return cfg.data.path
    trained_on = getattr(getattr(info.get("config"), "data", None), "path", None)
    return trained_on if trained_on and Path(trained_on).exists() else None


def _spread(items: list[Any], n: int) -> list[Any]:
    """n items spread evenly over the list (deterministic, not just the first n)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def load_data(cfg: Any, info: dict[str, Any], plan: ExportPlan, say: Say) -> tuple[ParityData, list[np.ndarray]]:
    """Validation images with ground truth (or generated images) for parity, and calibration images."""
    path = _dataset_path(cfg, info)
    n_raw = cfg.export.parity_images
    calib_n = cfg.export.int8_calib_size
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
        data = ParityData(images, gts, source, plan.imgsz, plan.resize, plan.task, plan.conf, cfg.eval.iou, n_raw)
        return data, calib
    from dfineseg.data.synthetic import synth_image

    rng = np.random.default_rng(0)
    images = [synth_image(rng)[0] for _ in range(max(n_raw, 2))]
    calib = [synth_image(rng)[0] for _ in range(calib_n)] if plan.int8 else []
    source = f"{len(images)} generated images (no dataset: data=... not given, F1 not checked)"
    say(f"parity: no dataset found, using {source}")
    return ParityData(images, None, source, plan.imgsz, plan.resize, plan.task, plan.conf, cfg.eval.iou, n_raw), calib


# ------------------------------------------------------------------------------------------ runners
def _ort_forward(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {"images": batch})))

    return forward


def _backend(path: Path, **options: Any) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], int | None, dict[str, Any]]:
    """The artefact opened the way users open it (the Predictor's backend), plus what actually runs."""
    from dfineseg.infer.backends import load_backend

    backend = load_backend(path, **options)
    r = backend.runtime
    runtime = {"backend": r.backend, "device": r.device, "precision": r.precision, "batch": r.batch, **r.extra}
    return backend.forward, r.batch, runtime


def check_finite_weights(model: Any, weights: Path, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights hold NaN/Inf: its outputs are NaN and every parity check would fail.
    The same rule the trainer applies before it saves (`nonfinite_weights`: the anchor caches excepted)."""
    import torch

    from dfineseg.train.checkpoint import nonfinite_weights

    state = model.state_dict()
    bad = nonfinite_weights(state)
    if bad:
        name, tensor = bad[0], state[bad[0]]
        which = "EMA weights" if info.get("ema") else "weights"
        raise ExportError(
            f"{weights}: the checkpoint's {which} are not finite: '{name}' holds {int((~torch.isfinite(tensor)).sum())} "
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
    # Fail before any work when a requested toolchain is missing.
    if "tensorrt" in e.formats:
        from dfineseg.export.tensorrt_export import import_tensorrt, require_gpu

        import_tensorrt()
        require_gpu()
    if "openvino" in e.formats:
        from dfineseg.export.openvino_export import import_openvino

        import_openvino()
    if e.int8:
        from dfineseg.export.int8 import import_nncf

        import_nncf()
    if e.int8 and "openvino" not in e.formats:
        raise ExportError("export.int8=true quantises the OpenVINO model: add openvino to format= (e.g. format=openvino int8=true)")

    # Refuse before any work when an output would replace a file dfineseg did not write.
    folder = OutputFolder(export_folder(weights, e), command="export", protect=[weights])
    keys = planned_artefacts(list(dict.fromkeys(e.formats)), e.half, e.int8)
    if not keys:
        raise ExportError("nothing to export: pass format= one or more of onnx, openvino, tensorrt")
    adopted = adopt_legacy_export(folder)
    if adopted:
        say(f"{folder.root}: written by an earlier dfineseg (no output ledger); its export files are adopted: "
            + ", ".join(adopted))
    folder.check_all(output_names(keys))
    run = ExportRun(keys, folder, say)
    base: dict[str, Any] = {"weights": str(weights), "imgsz": list(e.imgsz) if e.imgsz else None, "batch": e.batch,
                            "dynamic_batch": e.dynamic_batch, "topk": e.topk, "gather_sampler": e.gather_sampler,
                            "parity": e.parity}
    error: BaseException | None = None
    try:
        run.stage = folder.staging()
        from dfineseg.model.dfine import DeployModel
        from dfineseg.train.checkpoint import load_model_from_checkpoint

        model, info = load_model_from_checkpoint(weights)
        check_finite_weights(model, weights, info)
        plan = make_plan(weights, cfg, info)
        base["imgsz"] = list(plan.imgsz)
        deploy = DeployModel(model, topk=plan.topk).eval()
        base_meta = build_metadata(
            task=plan.task, names=plan.names, category_ids=plan.category_ids, imgsz=plan.imgsz,
            resize=plan.resize, conf=plan.conf, topk=plan.topk, precision="fp32",
        )
        with tempfile.TemporaryDirectory(prefix="dfineseg-parity-") as tmp:
            _export_all(plan, cfg, info, deploy, model, base_meta, Path(tmp), say, run)
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


@dataclass
class ParitySession:
    """PyTorch's reference answers for a checkpoint, to check artefacts made earlier (or by hand)."""

    plan: ExportPlan
    data: ParityData
    reference: Reference

    @staticmethod
    def backend(path: Path, **options: Any) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], int | None, dict[str, Any]]:
        if Path(path).suffix == ".xml" or Path(path).is_dir():
            options.setdefault("precision", "f32")
        return _backend(Path(path), **options)


def parity_session(weights: str | Path, cfg: Any, say: Say | None = None) -> ParitySession:
    """The data and the PyTorch reference `export_model` uses, without the pre-top-K twin graph."""
    from dfineseg.model.dfine import DeployModel
    from dfineseg.train.checkpoint import load_model_from_checkpoint

    model, info = load_model_from_checkpoint(weights)
    check_finite_weights(model, Path(weights), info)
    plan = make_plan(weights, cfg, info)
    data, _ = load_data(cfg, info, plan, say or (lambda _m: None))
    deploy = DeployModel(model, topk=plan.topk).eval()
    names = ("scores", "labels", "boxes", "mask_logits") if plan.task == "segment" else ("scores", "labels", "boxes")
    return ParitySession(plan, data, torch_reference(deploy, None, data, names))


def export(cfg: Any, say: Say | None = _print) -> dict[str, Path]:
    """`dfineseg export`: the checkpoint comes from `cfg.export.weights`."""
    if not cfg.export.weights:
        raise ExportError("no checkpoint to export: pass weights=path/to/best.pt")
    return export_model(cfg.export.weights, cfg, say)


def _export_all(
    plan: ExportPlan, cfg: Any, info: dict[str, Any], deploy: Any, model: Any, base_meta: dict[str, str], tmp: Path,
    say: Say, run: ExportRun,
) -> None:
    from dfineseg.export.onnx_export import RawOutputs, export_onnx

    e = cfg.export
    common = dict(
        imgsz=plan.imgsz, batch=plan.batch, dynamic_batch=plan.dynamic_batch, opset=plan.opset,
        simplify=plan.simplify, gather_sampler=plan.gather_sampler,
    )
    # Every format starts from the FP32 ONNX: an error making it is the failure of the first artefact.
    run.start(run.keys[0])
    onnx_path = run.staged("onnx")
    info_onnx = export_onnx(deploy, onnx_path, metadata=base_meta, **common)
    note = "" if info_onnx.simplified else f" (not simplified: {info_onnx.simplify_error or 'simplify=false'})"
    say(f"ONNX: exported ({artefact_size(onnx_path) / 1e6:.1f} MB, {info_onnx.seconds:.1f} s, opset {plan.opset}){note}")
    onnx_rec = ArtefactRecord("onnx", onnx_path, "fp32", info_onnx.seconds, extra={
        "simplified": info_onnx.simplified, "simplify_error": info_onnx.simplify_error, "op_counts": info_onnx.op_counts})

    data: ParityData | None = None
    ref: Reference | None = None
    twin_onnx: Path | None = None
    calib: list[np.ndarray] = []
    if plan.parity or plan.int8:
        data, calib = load_data(cfg, info, plan, say)
    if plan.parity:
        assert data is not None
        twin_onnx = tmp / "raw.onnx"
        # Unsimplified: the twin only has to compute the same numbers, and simplifying it would double the time.
        export_onnx(RawOutputs(model), twin_onnx, imgsz=plan.imgsz, batch=1, dynamic_batch=True, opset=plan.opset,
                    simplify=False, gather_sampler=plan.gather_sampler, output_names=RAW_NAMES)
        ref = torch_reference(deploy, RawOutputs(model), data, info_onnx.output_names)
        f1_txt = f", F1 {ref.f1['f1']:.4f}" if ref.f1 else ""
        say(f"PyTorch reference: {len(data.images)} images in {ref.seconds:.1f} s{f1_txt}")

    def check(rec: ArtefactRecord, forward: Any, fixed_batch: int | None, tol: Any, raw_forward: Any, runtime: dict) -> None:
        if not plan.parity:
            return
        assert data is not None and ref is not None
        # Judged here, in the staging folder; ExportRun.settle promotes it or keeps it aside and raises.
        rec.parity = run_parity(rec.path, rec.precision, forward, fixed_batch, data, ref, tol, raw_forward, runtime,
                                raise_on_failure=False)
        say(f"  parity {rec.key}: " + ", ".join(_brief(c) for c in rec.parity.checks))

    if "onnx" in plan.formats:
        fwd, fixed, runtime = _backend(onnx_path)
        check(onnx_rec, fwd, fixed, TOLERANCES["fp32"], _ort_forward(twin_onnx) if twin_onnx else None, runtime)
        onnx_path = run.settle(onnx_rec)

    fp16_path: Path | None = None
    if "onnx_fp16" in run.keys:
        rec = _write_fp16_onnx(onnx_path, run.start("onnx_fp16"), with_precision(base_meta, "fp16"), say)
        if twin_onnx is not None:
            _write_fp16_onnx(twin_onnx, tmp / "raw_fp16.onnx", {}, None)
        fwd, fixed, runtime = _backend(rec.path)
        check(rec, fwd, fixed, TOLERANCES["fp16"], _ort_forward(tmp / "raw_fp16.onnx") if twin_onnx else None, runtime)
        fp16_path = run.settle(rec)

    if "openvino" in plan.formats:
        _openvino_all(plan, e, onnx_path, twin_onnx, base_meta, tmp, data, calib, check, say, run)

    if "tensorrt" in plan.formats:
        from dfineseg.export.tensorrt_export import build_engine

        engine = run.start("tensorrt")
        einfo = build_engine(
            onnx_path, fp16_path, engine, imgsz=plan.imgsz, batch=plan.batch, dynamic_batch=plan.dynamic_batch,
            max_batch=max(plan.batch, 8) if plan.dynamic_batch else plan.batch, workspace_gb=e.workspace_gb,
            metadata=with_precision(base_meta, "fp16"),
        )
        say(f"TensorRT {einfo.tensorrt_version}: built ({artefact_size(engine) / 1e6:.1f} MB, {einfo.seconds:.1f} s)")
        rec = ArtefactRecord("tensorrt", engine, "fp16", einfo.seconds, extra={
            "tensorrt_version": einfo.tensorrt_version, "strongly_typed": einfo.strongly_typed})
        fwd, fixed, runtime = _backend(engine, device="cuda")
        check(rec, fwd, fixed, TOLERANCES["fp16"], None, runtime)
        run.settle(rec)


def _write_fp16_onnx(src: Path, dst: Path, metadata: dict[str, str], say: Say | None) -> ArtefactRecord:
    import onnx

    from dfineseg.export.fp16 import convert_to_fp16
    from dfineseg.export.meta import write_onnx_metadata

    t0 = time.perf_counter()
    fp16 = convert_to_fp16(onnx.load(str(src)))
    if metadata:
        write_onnx_metadata(fp16, metadata)
    atomic_write_bytes(dst, fp16.SerializeToString())
    seconds = time.perf_counter() - t0
    if say:
        say(f"ONNX FP16: converted ({artefact_size(dst) / 1e6:.1f} MB, {seconds:.1f} s; float32 inputs/outputs, LayerNorm/Softmax in float32)")
    return ArtefactRecord("onnx_fp16", dst, "fp16", seconds)


def _openvino_all(plan, e, onnx_path, twin_onnx, base_meta, tmp, data, calib, check, say, run: ExportRun) -> None:
    from dfineseg.export.openvino_export import (
        PARITY_PRECISION_HINT,
        compile_openvino,
        compiled_forward,
        export_openvino,
    )

    variants = [("openvino", "fp32", False)] + ([("openvino_fp16", "fp16", True)] if plan.half else [])
    fp32_xml = None
    for key, precision, compress in variants:
        out_dir = run.start(key)
        oinfo = export_openvino(onnx_path, out_dir, compress_fp16=compress, metadata=with_precision(base_meta, precision))
        say(f"OpenVINO {precision}: converted ({artefact_size(out_dir) / 1e6:.1f} MB, {oinfo.seconds:.1f} s)")
        rec = ArtefactRecord(key, out_dir, precision, oinfo.seconds, extra={"precision_hint": PARITY_PRECISION_HINT})
        raw_fwd = None
        if twin_onnx is not None:
            twin = export_openvino(twin_onnx, tmp / f"raw_{key}", compress_fp16=compress, metadata={})
            raw_fwd = compiled_forward(compile_openvino(twin.xml, PARITY_PRECISION_HINT))
        # Compiled from the staging folder: the compiled model lives in memory, so renaming the folder
        # afterwards (promotion) does not disturb it.
        fwd, fixed, runtime = _backend(oinfo.xml, precision=PARITY_PRECISION_HINT)
        check(rec, fwd, fixed, TOLERANCES[precision], raw_fwd, runtime)
        final = run.settle(rec)
        if key == "openvino":
            fp32_xml = final / oinfo.xml.name
    if plan.int8:
        from dfineseg.export.int8 import quantize_int8

        assert fp32_xml is not None and data is not None
        out_dir = run.start("openvino_int8")
        say(f"OpenVINO INT8: NNCF, {len(calib)} calibration images, max F1 drop {e.int8_max_drop} "
            "(if the first INT8 model drops more, NNCF ranks every quantised layer: this can take many minutes)")
        res = quantize_int8(
            fp32_xml, out_dir, calibration_images=calib, data=data, max_drop=e.int8_max_drop,
            metadata=base_meta, max_iterations=e.int8_max_iterations,
        )
        f1_txt = (
            f"F1 float {res.float_f1:.4f} -> INT8 {res.int8_f1:.4f} (drop {res.f1_drop:+.4f}, max {res.max_drop})"
            if res.f1_drop is not None else "F1 not measured"
        )
        say(f"OpenVINO INT8: quantised ({artefact_size(out_dir) / 1e6:.1f} MB, {res.seconds:.1f} s); {f1_txt}; {res.note}")
        rec = ArtefactRecord("openvino_int8", out_dir, "int8", res.seconds, extra={"int8": res.to_dict()})
        fwd, fixed, runtime = _backend(res.xml, precision=PARITY_PRECISION_HINT)
        check(rec, fwd, fixed, int8_tolerance(e.int8_max_drop), None, runtime)
        try:
            run.settle(rec)
        finally:
            # The accuracy report names the IR where it now lives (promoted, or kept aside as failed).
            if rec.path != out_dir and rec.path.is_dir():
                res.xml = rec.path / res.xml.name
                rec.extra["int8"] = res.to_dict()
                atomic_write_bytes(rec.path / "int8_accuracy.json", json.dumps(res.to_dict(), indent=2).encode())


def _brief(c: Any) -> str:
    if c.value is None and not c.judged:
        return f"{c.name} skipped"
    if c.value is None:
        return f"{c.name} {'ok' if c.passed else 'FAILED'}"
    if not c.judged:
        return f"{c.name} {c.value:.3g} (reported, not judged)"
    return f"{c.name} {c.value:.3g}<={c.limit:.3g} {'ok' if c.passed else 'FAILED'}"
