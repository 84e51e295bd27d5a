"""`dfineseg bench` on the trained fixture: every report is written, the torch row agrees with
`dfineseg val`, a format that cannot run here is skipped with its reason, and a broken artefact fails
alone without stopping the others."""

from __future__ import annotations

import csv
import json

import pytest

from dfineseg.config import build_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_result(trained_run, tmp_path_factory):
    from dfineseg.benchmarks.harness import run_bench

    out = tmp_path_factory.mktemp("bench")
    export_dir = out / "artefacts"
    export_dir.mkdir()
    # A corrupt FP16 IR stands in for a broken artefact: that row must fail alone.
    (export_dir / "openvino_fp16").mkdir()
    (export_dir / "openvino_fp16" / "model.xml").write_text("<net>not a model", encoding="utf-8")
    cfg = build_config({
        "data": {"path": str(trained_run.data_yaml)},
        "eval": {"conf": trained_run.conf, "plots": False},
        "export": {"out": str(export_dir), "int8_calib_size": 4},
        "bench": {"weights": str(trained_run.checkpoint), "out": str(out / "report"), "warmup": 2,
                  "formats": ["torch", "onnx", "ov-fp32", "ov-fp16", "trt-fp16"], "threads": 1},
    })
    rows = run_bench(cfg)
    return {row["format"]: row for row in rows}, out / "report", cfg


def test_every_output_is_written(bench_result):
    rows, report, _ = bench_result
    for name in ("bench.csv", "bench.md", "bench.json", "bench.png"):
        assert (report / name).stat().st_size > 0, name
    with open(report / "bench.csv", newline="") as fh:
        assert [r["format"] for r in csv.DictReader(fh)] == list(rows)
    data = json.loads((report / "bench.json").read_text())
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1 and "numpy" in data["machine"]["libraries"]
    assert "Machine:" in (report / "bench.md").read_text()


def test_runnable_formats_report_latency_and_accuracy(bench_result):
    rows, _, _ = bench_result
    for name in ("torch", "onnx", "ov-fp32"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert 0 < row["raw_mean_ms"] <= row["e2e_mean_ms"] * 1.5
        assert row["e2e_p50_ms"] <= row["e2e_p95_ms"]
        assert row["f1"] > 0.2 and row["params_m"] > 0 and row["size_mb"] > 0
    assert rows["ov-fp32"]["compute_precision"] == "f32"
    assert abs(rows["onnx"]["f1"] - rows["torch"]["f1"]) <= 0.02
    assert abs(rows["ov-fp32"]["f1"] - rows["torch"]["f1"]) <= 0.02


def test_torch_row_equals_val(bench_result, trained_run, tmp_path):
    from dfineseg.val import run_val

    rows, _, cfg = bench_result
    metrics = run_val(cfg, weights=trained_run.checkpoint, data=trained_run.data_yaml, conf=trained_run.conf,
                      out=tmp_path / "val", batch=1, verbose=False)
    assert rows["torch"]["f1"] == pytest.approx(metrics["headline"]["f1"], abs=1e-9)
    assert rows["torch"]["map50_95"] == pytest.approx(metrics["headline"]["map50_95"], abs=1e-6)


def test_unavailable_and_broken_formats_do_not_stop_the_others(bench_result):
    rows, report, _ = bench_result
    assert rows["trt-fp16"]["status"] == "skipped"
    assert "TensorRT" in rows["trt-fp16"]["reason"] or "tensorrt" in rows["trt-fp16"]["reason"]
    assert rows["ov-fp16"]["status"] in {"skipped", "failed"} and rows["ov-fp16"]["reason"]
    assert "trt-fp16" in (report / "bench.md").read_text()
