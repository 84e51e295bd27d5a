"""DESIGN "Outputs" and "Errors": no command writes over its inputs or over a file dfineseg did not write, each
may re-run over its own earlier output, an export replaces an artefact only after its checks pass (and says
so in its summary whatever happens), and bad input is one clear message.

Real files, real ONNX Runtime / OpenVINO; the slow part (exports of the trained fixture) is at the end.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from test_predictor_standin import scene

from dfineseg.infer.errors import UserError
from dfineseg.utils.outputs import LEDGER, OutputConflictError


def _digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): to prove that nothing was written or changed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _yolo_dataset(root: Path) -> Path:
    """A small YOLO-layout dataset: images/ with the pictures, labels/ with ground truth for each."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(3):
        cv2.imwrite(str(root / "images" / f"im{i}.png"), scene(60 + i)[:, :, ::-1])
        (root / "labels" / f"im{i}.txt").write_text(f"0 0.1 0.1 0.{i + 5} 0.1 0.{i + 5} 0.{i + 5}\n")
    (root / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a, b]\n")
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfineseg.cli", *args], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------ infer
def test_infer_into_the_dataset_refuses_to_overwrite_source_images(standin_files, tmp_path):
    from dfineseg.infer_cli import run_infer

    data = _yolo_dataset(tmp_path / "D")
    before = _digest(data)
    with pytest.raises(OutputConflictError, match=r"im0\.png is one of this command's inputs"):
        run_infer([f"model={standin_files.onnx}", f"source={data / 'images'}", f"out={data}", "progress=false"])
    assert _digest(data) == before, "nothing may be written before the refusal"


def test_infer_save_txt_refuses_to_overwrite_ground_truth_labels(standin_files, tmp_path):
    data = _yolo_dataset(tmp_path / "D")
    before = _digest(data)
    proc = _cli("infer", f"model={standin_files.onnx}", f"source={data / 'images'}", f"out={data}",
                "save_images=false", "save_txt=true", "progress=false")
    assert proc.returncode == 2, proc.stderr
    assert "im0.txt already exists and was not written by dfineseg" in proc.stderr
    assert "out=" in proc.stderr and "Traceback" not in proc.stderr
    assert _digest(data) == before, "the ground-truth labels must be untouched"


def test_infer_reruns_over_its_own_output_but_never_over_a_users_file(standin_files, tmp_path):
    from dfineseg.infer_cli import run_infer

    data = _yolo_dataset(tmp_path / "D")
    out = tmp_path / "run"
    args = [f"model={standin_files.onnx}", f"source={data / 'images'}", f"out={out}", "save_txt=true",
            "save_crops=true", "progress=false"]
    assert run_infer(args) == 0
    (out / "my_notes.txt").write_text("mine")
    first = _digest(out)
    assert run_infer(args) == 0  # the same run again: it replaces only what it wrote
    again = _digest(out)
    assert again.keys() == first.keys() and again["my_notes.txt"] == first["my_notes.txt"]
    assert {k: v for k, v in again.items() if k != "summary.json"} == {k: v for k, v in first.items() if k != "summary.json"}
    assert "my_notes.txt" not in (out / LEDGER).read_text().split()
    # A folder holding a user's own predictions.json: refused before any work, the file untouched.
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.json").write_text("[\"user data\"]")
    with pytest.raises(OutputConflictError, match="predictions.json already exists and was not written by dfineseg"):
        run_infer([*args[:2], f"out={other}", "progress=false"])
    assert _digest(other) == {"predictions.json": hashlib.sha256(b"[\"user data\"]").hexdigest()}


def test_infer_out_an_existing_file_is_a_clear_error(standin_files, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("a user's file")
    cv2.imwrite(str(tmp_path / "a.png"), scene(3)[:, :, ::-1])
    proc = _cli("infer", f"model={standin_files.onnx}", f"source={tmp_path / 'a.png'}", f"out={target}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"out={target} is an existing file, not a folder" in proc.stderr
    assert target.read_text() == "a user's file"


# ------------------------------------------------------------------------------------------ predictor inputs
def test_predict_none_and_other_bad_inputs_are_clear_errors(standin_files, tmp_path):
    from dfineseg.infer.image_io import ImageReadError
    from dfineseg.infer.predictor import Predictor

    predictor = Predictor.load(standin_files.onnx)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(UserError, match="got None instead of an image.*cv2.imread.*missing or unreadable"):
        predictor.predict(cv2.imread(str(missing)))
    with pytest.raises(UserError, match=r"None instead of an image \(item 1 of the list\)"):
        predictor.predict([scene(1), None])
    with pytest.raises(UserError, match="None instead of an image"):
        predictor.predict_batch([None])
    with pytest.raises(ImageReadError, match="missing.jpg"):
        predictor.predict(str(missing))
    with pytest.raises(UserError, match="empty"):
        predictor.predict(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(UserError, match=r"shape \(0,\)"):
        predictor.predict(np.array([]))
    with pytest.raises(UserError, match="dtype int64"):
        predictor.predict(np.zeros((32, 32, 3), np.int64))
    with pytest.raises(UserError, match=r"shape \(32, 32, 5\)"):
        predictor.predict(np.zeros((32, 32, 5), np.uint8))
    with pytest.raises(UserError, match="got int"):
        predictor.predict(5)


# ------------------------------------------------------------------------------------------ foreign model files
def test_onnx_from_a_newer_onnx_says_why_it_cannot_load(standin_files, tmp_path):
    from dfineseg.infer.backends import ModelFileError
    from dfineseg.infer.predictor import Predictor

    model = onnx.load(str(standin_files.onnx))
    model.ir_version = 99
    foreign = tmp_path / "from_the_future.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ModelFileError) as info:
        Predictor.load(foreign)
    message = str(info.value)
    assert str(foreign) in message
    assert "Unsupported model IR version: 99, max supported IR version:" in message  # ONNX Runtime's own reason
    assert "pip install -U onnxruntime" in message and "onnxruntime::Model" not in message
    cv2.imwrite(str(tmp_path / "a.png"), scene(3)[:, :, ::-1])
    proc = _cli("infer", f"model={foreign}", f"source={tmp_path / 'a.png'}", f"out={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "Unsupported model IR version: 99" in proc.stderr and str(foreign) in proc.stderr


def test_unreadable_openvino_ir_gives_openvinos_reason(tmp_path):
    from dfineseg.infer.backends import ModelFileError
    from dfineseg.infer.predictor import Predictor

    (tmp_path / "model.xml").write_text("<net>not a model", encoding="utf-8")
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelFileError, match="Unable to read the model") as info:
        Predictor.load(tmp_path / "model.xml")
    assert "Exception from src" not in str(info.value)


# ------------------------------------------------------------------------------------------ val / bench / export up front
def test_val_refuses_bad_out_and_reruns_over_its_own(tmp_path):
    from dfineseg.config import build_config
    from dfineseg.data.synthetic import write_synthetic_dataset
    from dfineseg.infer.detections import Detections
    from dfineseg.val import run_val

    data_yaml = write_synthetic_dataset(tmp_path / "data", n_train=1, n_val=2, seed=0)
    cfg = build_config({"eval": {"plots": False}})
    calls = {"n": 0}

    def nothing(images):
        calls["n"] += len(images)
        return [Detections.empty(im.shape[:2], with_masks=True) for im in images]

    def val(out):
        return run_val(cfg, predict=nothing, data=data_yaml, task="segment", out=out, verbose=False)

    a_file = tmp_path / "metrics.txt"
    a_file.write_text("mine")
    with pytest.raises(OutputConflictError, match="is an existing file, not a folder"):
        val(a_file)
    user = tmp_path / "user"
    user.mkdir()
    (user / "metrics.json").write_text("{\"mine\": 1}")
    with pytest.raises(OutputConflictError, match="metrics.json already exists and was not written by dfineseg"):
        val(user)
    assert calls["n"] == 0, "refused before any image was predicted"
    assert (user / "metrics.json").read_text() == "{\"mine\": 1}"
    with pytest.raises(OutputConflictError, match="one of this command's inputs"):
        val(tmp_path / "data" / "images" / "val")
    out = tmp_path / "val"
    val(out)
    val(out)  # over its own output
    assert json.loads((out / "metrics.json").read_text())["images"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".val-staging")]


def test_bench_refuses_a_users_report_before_any_work(tmp_path):
    from dfineseg.benchmarks.harness import run_bench, write_reports
    from dfineseg.benchmarks.machine import machine_info
    from dfineseg.config import build_config

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"never read: the output check comes first")
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.md").write_text("my notes")
    data = tmp_path / "data.yaml"
    data.write_text("never read either\n")
    cfg = build_config({"data": {"path": str(data)},
                        "bench": {"weights": str(weights), "out": str(out), "formats": ["onnx"]}})
    with pytest.raises(OutputConflictError, match="bench.md already exists and was not written by dfineseg"):
        run_bench(cfg)
    assert (out / "bench.md").read_text() == "my notes"
    mine = tmp_path / "mine"
    rows = [{"format": "onnx", "status": "skipped", "reason": "test"}]
    machine = machine_info(1)
    write_reports(rows, machine, mine)
    write_reports(rows, machine, mine)  # over its own reports
    assert {p.name for p in mine.iterdir()} == {"bench.csv", "bench.md", "bench.json", "bench.png", LEDGER}


def test_export_refuses_a_users_file_and_an_unwritable_folder_up_front(tmp_path):
    from dfineseg.config import build_config
    from dfineseg.export.api import export_model

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"never read: the output check comes first")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"a user's own model")
    cfg = build_config({"export": {"formats": ["onnx"], "out": str(out)}})
    with pytest.raises(OutputConflictError, match="model.onnx already exists and was not written by dfineseg"):
        export_model(weights, cfg, say=None)
    assert _digest(out) == {"model.onnx": hashlib.sha256(b"a user's own model").hexdigest()}
    # out= under a regular file, and a folder even root cannot write to (sysfs): one message, no OSError.
    cfg.export.out = str(weights / "sub")
    with pytest.raises(OutputConflictError, match="cannot create the output folder"):
        export_model(weights, cfg, say=None)
    sysfs = Path("/sys")
    if sys.platform.startswith("linux") and sysfs.is_dir():
        cfg.export.out = str(sysfs)
        with pytest.raises(OutputConflictError, match="is not writable"):
            export_model(weights, cfg, say=None)
    # the checkpoint itself is never an output
    cfg.export.out = str(tmp_path)
    weights_copy = tmp_path / "model.onnx"
    weights_copy.write_bytes(weights.read_bytes())
    with pytest.raises(OutputConflictError, match="one of this command's inputs"):
        export_model(weights_copy, cfg, say=None)


# ------------------------------------------------------------------------------------------ exports (trained fixture)
def _export_config(trained_run, out, **export):
    from dfineseg.model.checkpoint import config_from_checkpoint, load_checkpoint

    cfg = config_from_checkpoint(load_checkpoint(trained_run.checkpoint))
    cfg.data.path = str(trained_run.data_yaml)
    cfg.export.parity_images = 2
    cfg.export.out = str(out)
    for key, value in export.items():
        setattr(cfg.export, key, value)
    return cfg


def _summary(out: Path) -> dict:
    return json.loads((out / "export_summary.json").read_text())


@pytest.mark.slow
def test_a_failed_export_keeps_the_earlier_good_artefact_and_the_summary_says_so(trained_run, tmp_path, monkeypatch):
    from onnx import numpy_helper

    from dfineseg.export import openvino_export, tolerances
    from dfineseg.export.api import export_model
    from dfineseg.export.errors import ParityError

    out = tmp_path / "export"
    cfg = _export_config(trained_run, out, formats=["onnx", "openvino"])
    export_model(trained_run.checkpoint, cfg, say=None)
    assert _summary(out)["artefacts"]["openvino"]["parity"]["passed"]
    good_ir = _digest(out / "openvino")

    # 1. The OpenVINO IR comes out numerically wrong (noise on the class head of the ONNX it converts): it
    #    fails parity, is kept aside as openvino.failed/, and the earlier openvino/ stays as it was.
    real = openvino_export.export_openvino

    def corrupted(onnx_path, out_dir, **kw):
        if out_dir.name != "openvino":  # the pre-top-K twin converts through here too
            return real(onnx_path, out_dir, **kw)
        model = onnx.load(str(onnx_path))
        head = [n for n in model.graph.node if "dec_score_head" in n.name and n.op_type in ("MatMul", "Gemm")][-1]
        init = next(t for t in model.graph.initializer if t.name in head.input)
        arr = numpy_helper.to_array(init)
        noise = np.random.default_rng(0).standard_normal(arr.shape) * 0.5 * arr.std()
        init.CopyFrom(numpy_helper.from_array((arr + noise).astype(arr.dtype), init.name))
        bad = tmp_path / "bad.onnx"
        onnx.save(model, str(bad))
        return real(bad, out_dir, **kw)

    monkeypatch.setattr(openvino_export, "export_openvino", corrupted)
    with pytest.raises(ParityError) as failure:
        export_model(trained_run.checkpoint, cfg, say=None)
    monkeypatch.undo()
    assert _digest(out / "openvino") == good_ir
    assert "openvino.failed: parity with PyTorch failed" in str(failure.value)
    assert not json.loads((out / "openvino.failed" / "parity.json").read_text())["passed"]
    summary = _summary(out)
    assert summary["status"] == "failed" and "parity with PyTorch failed" in summary["error"]
    assert summary["results"]["onnx"]["status"] == "passed"
    assert summary["results"]["openvino"] == {"status": "failed", "path": str(out / "openvino.failed")}
    assert summary["artefacts"]["openvino"]["parity"]["passed"] is False
    assert summary["earlier_artefacts"]["openvino"]["path"] == str(out / "openvino")

    # 2. The ONNX fails its check (a tolerance nothing can meet): model.onnx keeps its bytes, the new one is
    #    model.failed.onnx, the summary says failed / not run, and the error is raised after it was written.
    good_onnx = (out / "model.onnx").read_bytes()
    monkeypatch.setitem(tolerances.TOLERANCES, "fp32", tolerances.Tolerance(raw=-1.0, f1=-1.0))
    with pytest.raises(ParityError) as failure:
        export_model(trained_run.checkpoint, cfg, say=None)
    monkeypatch.undo()
    assert (out / "model.onnx").read_bytes() == good_onnx
    assert json.loads((out / "model.onnx.parity.json").read_text())["passed"]
    assert "model.failed.onnx: parity with PyTorch failed" in str(failure.value)
    assert "is unchanged" in str(failure.value)
    assert (out / "model.failed.onnx").is_file()
    assert not json.loads((out / "model.failed.onnx.parity.json").read_text())["passed"]
    summary = _summary(out)
    assert summary["status"] == "failed"
    assert summary["results"]["onnx"]["status"] == "failed"
    assert summary["results"]["openvino"]["status"] == "not-run"
    assert not any(r.get("status") == "passed" for r in summary["results"].values())
    assert summary["artefacts"]["onnx"]["path"] == str(out / "model.failed.onnx")
    assert set(summary["earlier_artefacts"]) == {"onnx", "openvino"}
    ledger = (out / LEDGER).read_text().split()
    assert {"model.failed.onnx", "model.failed.onnx.parity.json", "openvino.failed"} <= set(ledger)
    assert not [p for p in out.iterdir() if "staging" in p.name or ".old-" in p.name]

    # 3. Fixed: a passing export replaces both and clears the stale failures.
    export_model(trained_run.checkpoint, cfg, say=None)
    summary = _summary(out)
    assert summary["status"] == "passed" and summary["error"] is None
    assert all(r["status"] == "passed" for r in summary["results"].values())
    assert not (out / "model.failed.onnx").exists() and not (out / "openvino.failed").exists()


@pytest.mark.slow
def test_a_checkpoint_with_nan_weights_is_refused_by_name(trained_run, tmp_path):
    import torch

    from dfineseg.export.api import export_model, load_data, make_plan
    from dfineseg.export.errors import ExportError, ParityError
    from dfineseg.export.parity_data import torch_reference
    from dfineseg.infer.graph import OUTPUT_NAMES
    from dfineseg.model.model_file import load_model_file
    from dfineseg.model.runner import deploy_module

    ckpt = torch.load(trained_run.checkpoint, weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if k.endswith("conv.weight") and v.is_floating_point())
    for section in ("model", "ema"):
        if ckpt.get(section) is not None:
            ckpt[section][name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    out = tmp_path / "export"
    cfg = _export_config(trained_run, out, formats=["onnx"])
    with pytest.raises(ExportError, match=f"'{name}' holds 1 NaN/Inf value"):
        export_model(bad, cfg, say=None)
    assert not (out / "model.onnx").exists()
    summary = _summary(out)
    assert summary["status"] == "failed" and name in summary["error"]
    assert summary["results"]["onnx"]["status"] == "not-run"
    # Past that guard (a model loaded some other way), parity names the reason instead of crashing.
    opened = load_model_file(bad)
    plan = make_plan(bad, cfg, opened)
    data, _ = load_data(cfg, opened, plan, lambda _m: None)
    with pytest.raises(ParityError, match="PyTorch reference outputs are not finite"):
        torch_reference(deploy_module(opened.model, plan.topk), None, data, OUTPUT_NAMES)


def test_export_report_never_overwrites_a_users_file_next_to_the_summary(tmp_path):
    from dfineseg.benchmarks.export_report import main as export_report
    from dfineseg.utils.outputs import OutputConflictError

    summary = tmp_path / "export_summary.json"
    summary.write_text(json.dumps({
        "status": "failed", "error": "ParityError: outputs", "weights": "best.pt", "imgsz": [64, 64], "batch": 1,
        "dynamic_batch": True, "topk": 10, "artefacts": {},
        "results": {"onnx": {"status": "failed", "path": "model.failed.onnx"}, "openvino": {"status": "not-run"}},
    }), encoding="utf-8")
    assert export_report(["--summary", str(summary)]) == 0  # a new report: written, and owned by dfineseg
    report = (tmp_path / "export_report.md").read_text(encoding="utf-8")
    # the report says what failed, not only what was made
    assert "Export status: failed" in report and "- onnx: failed" in report and "- openvino: not-run" in report
    assert export_report(["--summary", str(summary)]) == 0  # its own earlier report: replaced
    mine = tmp_path / "other"
    mine.mkdir()
    (mine / "export_summary.json").write_text(summary.read_text(), encoding="utf-8")
    (mine / "export_report.md").write_text("my notes", encoding="utf-8")
    with pytest.raises(OutputConflictError, match="export_report.md"):
        export_report(["--summary", str(mine / "export_summary.json")])
    assert (mine / "export_report.md").read_text(encoding="utf-8") == "my notes"


def test_an_export_folder_an_earlier_dfineseg_wrote_is_adopted_from_its_summary(tmp_path):
    """Before ledgers: export_summary.json lists what dfineseg made there; those (and only those) may be
    replaced by a new export after its checks."""
    from dfineseg.export.publish import adopt_legacy_export, output_names
    from dfineseg.utils.outputs import OutputFolder

    (tmp_path / "model.onnx").write_bytes(b"old export")
    (tmp_path / "model.onnx.parity.json").write_text("{}")
    (tmp_path / "model_fp16.onnx").write_bytes(b"not listed: the user's")
    summary = {"weights": "best.pt", "artefacts": {"onnx": {"path": str(tmp_path / "model.onnx")}}}
    (tmp_path / "export_summary.json").write_text(json.dumps(summary))
    folder = OutputFolder(tmp_path, command="export")
    adopted = adopt_legacy_export(folder)
    assert set(adopted) == {"model.onnx", "model.onnx.parity.json", "export_summary.json"}
    folder.check_all(output_names(["onnx"]))  # the listed artefact may now be replaced
    with pytest.raises(OutputConflictError, match="model_fp16.onnx"):
        folder.check_all(output_names(["onnx", "onnx_fp16"]))
    # A folder with a ledger, or a json that is not a dfineseg summary, adopts nothing.
    assert adopt_legacy_export(OutputFolder(tmp_path, command="export")) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"x")
    (other / "export_summary.json").write_text(json.dumps({"artefacts": {"onnx": {"path": "/elsewhere/model.onnx"}}}))
    assert adopt_legacy_export(OutputFolder(other, command="export")) == []


def test_staging_folders_of_a_killed_run_are_removed_and_a_live_runs_kept(tmp_path):
    import os

    from dfineseg.utils.outputs import OutputFolder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited: its staging folder is left over from a kill
    stale = tmp_path / f".dfineseg-staging-export-{dead_pid}-abc123"
    live = tmp_path / f".dfineseg-staging-export-{os.getpid()}-def456"
    mine = tmp_path / ".dfineseg-staging-notes"  # not our name pattern: the user's
    for folder in (stale, live, mine):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x")
    new = OutputFolder(tmp_path, command="export").staging()
    assert not stale.exists() and live.exists() and mine.exists() and new.is_dir()
    assert new.name.startswith(f".dfineseg-staging-export-{os.getpid()}-")
