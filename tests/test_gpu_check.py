"""`python -m dfineseg.benchmarks.gpu_check`: the CPU smoke run (`--device cpu --quick`) works without the
packages the GPU image lacks, reports training, DDP over gloo and latency, refuses `--device cuda` without
CUDA and a foreign `--out`; its stand-in configuration equals the schema's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dfineseg.benchmarks import gpu_check_setup

# What the GPU image does not have (or a deployment extra): the check must not import any of them.
BLOCKED = ("pydantic", "pycocotools", "faster_coco_eval", "openvino", "nncf", "tensorrt")


def _blocking_env(tmp_path):
    """An environment whose interpreters (spawned DDP ranks too) behave as if BLOCKED were not installed: a
    sitecustomize on PYTHONPATH maps each to None in sys.modules, so `import` raises ModuleNotFoundError and
    `importlib.util.find_spec` answers None (torch's dynamo probes optional packages that way)."""
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        for name in {BLOCKED!r}:
            sys.modules[name] = None
    """), encoding="utf-8")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "2"}


def _run(args, env, cwd, timeout=240):
    return subprocess.run([sys.executable, "-m", "dfineseg.benchmarks.gpu_check", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def test_stand_in_config_equals_the_schema_defaults():
    from dfineseg.config import Config

    cfg = Config()
    model = gpu_check_setup.model_cfg(cfg.model.size)
    for key in (*gpu_check_setup.MODEL_DEFAULTS, "size"):
        assert getattr(model, key) == getattr(cfg.model, key), key
    # Every mask-head and loss field: a new one in the schema must be added to the stand-in.
    assert vars(model.mask_head) == cfg.model.mask_head.model_dump()
    assert vars(gpu_check_setup.loss_cfg()) == cfg.loss.model_dump()
    train = gpu_check_setup.train_cfg()
    for key in gpu_check_setup.TRAIN_DEFAULTS:
        assert getattr(train, key) == getattr(cfg.train, key), key


def test_quick_cpu_run_without_the_gpu_image_missing_packages(tmp_path):
    env = _blocking_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import pydantic"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # the blocker works
    (tmp_path / "tmp").mkdir()
    res = _run(["--device", "cpu", "--quick", "--out", "tmp/x.json"], env, tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "| check | case | status | result | note |" in res.stdout
    assert res.stdout.count("| check | case |") == 1  # one table
    data = json.loads((tmp_path / "tmp" / "x.json").read_text(encoding="utf-8"))
    assert data["gpu_check"]["settings"]["quick"] is True
    rows = {(r["check"], r["case"]): r for r in data["rows"]}
    train = rows[("train", "n fp32")]
    assert train["status"] == "ok" and train["images_per_s"] > 0 and train["peak_mem_gib"] > 0
    assert train["nonfinite_losses"] == 0 and len(train["losses"]) == train["steps"] + train["warmup"]
    fp16 = rows[("train", "n amp-fp16")]
    assert fp16["status"] == "skipped" and "CUDA" in fp16["reason"]
    gloo = rows[("ddp", "gloo, 2 CPU processes")]
    assert gloo["status"] == "ok", gloo
    assert gloo["weights_rel_spread"] <= 1e-6 and all(r["all_reduce_ok"] for r in gloo["ranks"])
    assert rows[("ddp", "nccl")]["status"] == "skipped"
    lat = rows[("latency", "n fp32")]
    # conf 0 keeps every top-K query (K = min(100, the anchors of a 64 px input))
    assert lat["status"] == "ok" and 0 < lat["raw_ms"] and 0 < lat["detections_all_kept"] <= 100
    assert rows[("latency", "n fp16")]["status"] == "skipped"
    # Every row of the JSON is a line of the printed table.
    for r in data["rows"]:
        assert f"| {r['check']} | {r['case']} | {r['status']} |" in res.stdout
    # A re-run may replace its own earlier result.
    gpu_check_setup.check_out_path(tmp_path / "tmp" / "x.json")


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = _run(["--out", "y.json"], {**os.environ}, tmp_path, timeout=120)
    assert res.returncode == 2
    assert "CUDA is not available" in res.stderr and "--device cpu" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "y.json").exists()


def test_a_foreign_out_file_is_never_overwritten(tmp_path):
    foreign = tmp_path / "results.json"
    for text in ("my notes, not JSON", json.dumps({"rows": []}), json.dumps([1, 2])):
        foreign.write_text(text, encoding="utf-8")
        with pytest.raises(gpu_check_setup.OutPathError, match="not an earlier gpu_check result"):
            gpu_check_setup.check_out_path(foreign)
    with pytest.raises(gpu_check_setup.OutPathError, match="is a folder"):
        gpu_check_setup.check_out_path(tmp_path)
    gpu_check_setup.check_out_path(tmp_path / "new.json")
    (tmp_path / "old.json").write_text(json.dumps({"gpu_check": {"schema": 1}}), encoding="utf-8")
    gpu_check_setup.check_out_path(tmp_path / "old.json")
    # Through the command: refused before anything runs, the file left as it was.
    res = _run(["--device", "cpu", "--quick", "--out", str(foreign)], {**os.environ}, tmp_path, timeout=120)
    assert res.returncode == 2 and "left untouched" in res.stderr and "Traceback" not in res.stderr
    assert foreign.read_text(encoding="utf-8") == json.dumps([1, 2])


def test_a_spent_time_budget_skips_the_rest_and_says_so(tmp_path):
    res = _run(["--device", "cpu", "--quick", "--budget", "0.001", "--out", "z.json"], {**os.environ}, tmp_path,
               timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "z.json").read_text(encoding="utf-8"))["rows"]
    assert {r["check"] for r in rows} == {"train", "ddp"} and all(r["status"] == "skipped" for r in rows)
    assert "time budget" in rows[0]["reason"] and "time budget" in res.stdout
