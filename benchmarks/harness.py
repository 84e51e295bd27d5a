"""`dfineseg bench`: latency and accuracy of every format under the D-FINE-seg paper's protocol.

Protocol (paper section 5; dfine-facts section 9): batch 1; warm up on `warmup` images; then per
validation image, already decoded into memory: synchronise, start the timer, preprocess + forward +
postprocess (masks at original resolution), synchronise, stop. The raw forward is timed separately on
the same preprocessed inputs. Accuracy (F1/P/R/penalised IoU at the fixed threshold, COCO mAP at conf
0.01) comes from the same artefact in the same process: nothing is re-exported between the two.

The rows (`bench.formats`), the artefact each runs and its Predictor options are the export registry's
(`dfineseg.export.formats.BENCH_ROWS`); an artefact missing from the export folder is exported once.
A format that cannot run here (no TensorRT, no GPU) is reported as skipped with the reason; a format
that fails is reported as failed with the error, and the others still run.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.benchmarks.machine import describe, machine_info
from dfineseg.export.formats import BENCH_ROWS
from dfineseg.infer.errors import BackendUnavailableError, UserError

COLUMNS = ["format", "status", "e2e_mean_ms", "e2e_p50_ms", "e2e_p95_ms", "raw_mean_ms", "raw_p50_ms",
           "raw_p95_ms", "e2e_over_raw", "f1", "precision", "recall", "penalized_iou", "boundary_iou", "map50_95",
           "map50", "params_m", "size_mb", "backend", "device", "compute_precision", "float_op_share", "images", "file",
           "reason"]


def interleaved_times_ms(runners: dict[Any, Callable[[], object]], runs: int, warmup: int) -> dict[Any, list[float]]:
    """Per runner, its ms in each round (index i = round i); the runners take turns, so the i-th times of two
    runners were taken within one round, under the same machine state."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[Any, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
    return times


def interleaved_median_ms(runners: dict[Any, Callable[[], object]], runs: int, warmup: int) -> dict[Any, float]:
    """Median ms per runner; the runners take turns so that a busy machine slows them all alike and the
    ratios between variants stay meaningful."""
    return {k: statistics.median(v) for k, v in interleaved_times_ms(runners, runs, warmup).items()}


def latency_stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan")}
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}


def file_size_mb(path: Path) -> float:
    """Size on disk of a model, with its OpenVINO .bin or external-data sidecars."""
    files = [path]
    if path.suffix == ".xml":
        files.append(path.with_suffix(".bin"))
    files += list(path.parent.glob(path.name + ".data"))
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


@dataclass
class BenchInputs:
    """The evaluation images, decoded once and kept in memory (the protocol times no disk reads)."""

    index: Any
    images: list[np.ndarray]

    @property
    def image_ids(self) -> list[int]:
        return [rec.image_id for rec in self.index.images]


def load_bench_inputs(data_path: str, split: str, limit: int | None, allow_outside_root: bool = False) -> BenchInputs:
    from dfineseg.data import load_index, read_image

    index = load_index(data_path, split, allow_outside_root=allow_outside_root)
    if limit is not None:
        index.images = index.images[:limit]
    if not index.images:
        raise UserError(f"{data_path}: split '{split}' has no images to benchmark")
    images = [read_image(rec.file) for rec in index.images]
    return BenchInputs(index=index, images=images)


class Timer:
    """Wall-clock timing with an optional device synchronisation before each reading."""

    def __init__(self, synchronize: Any = None) -> None:
        self._sync = synchronize or (lambda: None)

    def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        self._sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self._sync()
        return out, time.perf_counter() - start


def measure_predictor(predictor: Any, inputs: BenchInputs, warmup: int, conf: float, map_conf: float,
                      task: str, progress: Any = None) -> dict[str, Any]:
    """Latency (end-to-end and raw forward) at `conf`, then accuracy from a pass at `map_conf`."""
    from dfineseg.evaluate import evaluate
    from dfineseg.infer.preprocess import preprocess

    timer = Timer(getattr(predictor.backend, "synchronize", None))
    info = predictor.info
    for img in (inputs.images * (1 + warmup // max(1, len(inputs.images))))[:warmup]:
        predictor.predict(img, conf=conf)
    e2e, raw = [], []
    for img in inputs.images:
        _, seconds = timer(predictor.predict, img, conf=conf)
        e2e.append(seconds)
        batch, _ = preprocess([img], info.imgsz, info.resize)
        _, seconds = timer(predictor.backend.forward, batch)
        raw.append(seconds)
        if progress is not None:
            progress.update(1)
    predictions = {rid: predictor.predict(img, conf=map_conf) for rid, img in zip(inputs.image_ids, inputs.images)}
    metrics = evaluate(inputs.index, predictions, task=task, conf=conf)
    return {"e2e": latency_stats(e2e), "raw": latency_stats(raw), "metrics": metrics}


def _metric_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """Pick the headline numbers: masks for segment, boxes for detect (see dfineseg.evaluate)."""
    head = metrics["headline"]
    return {
        "f1": head["f1"], "precision": head["precision"], "recall": head["recall"],
        "penalized_iou": head["penalized_iou"], "boundary_iou": head.get("boundary_iou"),
        "map50_95": head["map50_95"], "map50": head["map50"],
    }


def ensure_artefact(fmt: str, weights: Path, export_dir: Path, cfg: Any) -> Path:
    """The file a format runs: the checkpoint, or an export in `export_dir` (exported once if missing)."""
    _, artefact = BENCH_ROWS[fmt]
    if artefact is None:
        return weights
    path = export_dir / artefact.entry
    if path.exists():
        return path
    from dfineseg.export.api import export_model

    export_cfg = cfg.model_copy(deep=True)
    export_cfg.export.out = str(export_dir)
    for key, value in artefact.export_settings().items():
        setattr(export_cfg.export, key, value)
    export_model(str(weights), export_cfg)
    if not path.exists():
        raise UserError(f"export for {fmt} finished but {path} was not written")
    return path


def count_params(weights: Path) -> float:
    from dfineseg.model import count_parameters
    from dfineseg.model.model_file import load_model_file

    return count_parameters(load_model_file(weights).model) / 1e6


def run_bench(cfg: Any) -> list[dict[str, Any]]:
    """Benchmark `cfg.bench.formats` (+ peers) and write bench.csv/.md/.json and bench.png."""
    from tqdm import tqdm

    from dfineseg.infer.predictor import Predictor

    weights = Path(cfg.bench.weights or "runs/demo/best.pt")
    if not weights.is_file():
        raise UserError(f"checkpoint not found: {weights} (train one with `make demo` or pass weights=PATH)")
    if not cfg.data.path:
        raise UserError("no dataset: pass data=path/to/data.yaml (the validation split is measured)")
    from dfineseg.utils.outputs import OutputFolder

    # Refuse before any work when a report would replace a file dfineseg did not write, or land on an input.
    folder = OutputFolder(cfg.bench.out, command="bench", protect=[weights, cfg.data.path, *cfg.bench.peers])
    folder.check_all([*REPORTS, *(_log_name(name) for name in [*cfg.bench.formats, *_peer_names(cfg.bench.peers)])])
    out_dir = folder
    export_dir = Path(cfg.export.out) if cfg.export.out else weights.parent
    inputs = load_bench_inputs(cfg.data.path, cfg.eval.split, cfg.bench.images, cfg.data.allow_outside_root)
    machine = machine_info(cfg.bench.threads)
    params_m = count_params(weights)
    rows: list[dict[str, Any]] = []
    total = len(inputs.images) * (len(cfg.bench.formats) + len(cfg.bench.peers))
    with tqdm(total=total, desc="bench", unit="img") as bar:
        for fmt in cfg.bench.formats:
            rows.append(_bench_one(fmt, lambda f=fmt: _open_format(f, weights, export_dir, cfg, Predictor),
                                   inputs, cfg, params_m, bar, out_dir))
        for peer in cfg.bench.peers:
            rows.append(_bench_one(_peer_names([peer])[0], lambda p=peer: _open_peer(p, cfg),
                                   inputs, cfg, None, bar, out_dir))
    write_reports(rows, machine, folder)
    return rows


REPORTS = ("bench.csv", "bench.md", "bench.json", "bench.png")


def _peer_names(peers: list[str]) -> list[str]:
    return [f"peer:{Path(peer).name}" for peer in peers]


def _log_name(row_name: str) -> str:
    return f"error_{row_name.replace(':', '_')}.log"


def _open_format(fmt: str, weights: Path, export_dir: Path, cfg: Any, predictor_cls: Any) -> tuple[Any, Path]:
    path = ensure_artefact(fmt, weights, export_dir, cfg)
    options = dict(BENCH_ROWS[fmt][0].options)
    if cfg.bench.threads:
        options["threads"] = cfg.bench.threads
    return predictor_cls.load(path, conf=cfg.eval.conf, **options), path


def _open_peer(path: str, cfg: Any) -> tuple[Any, Path]:
    from dfineseg.benchmarks.peers import YoloSegRunner
    from dfineseg.infer.predictor import Predictor

    runner = YoloSegRunner(path, threads=cfg.bench.threads)
    return Predictor.from_backend(runner, names=None, resize=runner.resize, imgsz=runner.input_hw,
                                  conf=cfg.eval.conf), Path(path)


def _bench_one(name: str, opener: Any, inputs: BenchInputs, cfg: Any, params_m: float | None,
               bar: Any, out_dir: Any) -> dict[str, Any]:
    """One row; `out_dir` (an OutputFolder) receives the traceback of a format that fails."""
    row: dict[str, Any] = {"format": name, "images": len(inputs.images)}
    try:
        predictor, path = opener()
        task = predictor.info.task
        result = measure_predictor(predictor, inputs, cfg.bench.warmup, cfg.eval.conf, cfg.eval.map_conf, task, bar)
    except (BackendUnavailableError, UserError) as exc:
        bar.write(f"{name}: skipped: {exc}")
        return {**row, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # one broken format must not stop the others; the traceback is kept
        log = out_dir.write_text(_log_name(name), traceback.format_exc())
        bar.write(f"{name}: FAILED: {type(exc).__name__}: {exc} (traceback in {log})")
        return {**row, "status": "failed", "reason": f"{type(exc).__name__}: {exc} (see {log.name})"}
    runtime = predictor.backend.runtime
    e2e, raw = result["e2e"], result["raw"]
    row.update({
        "status": "ok", "file": str(path),
        "e2e_mean_ms": e2e["mean"], "e2e_p50_ms": e2e["p50"], "e2e_p95_ms": e2e["p95"],
        "raw_mean_ms": raw["mean"], "raw_p50_ms": raw["p50"], "raw_p95_ms": raw["p95"],
        "e2e_over_raw": e2e["mean"] / raw["mean"] if raw["mean"] > 0 else float("nan"),
        **_metric_row(result["metrics"]),
        "params_m": params_m if params_m is not None else _onnx_params(path),
        "size_mb": file_size_mb(path), "backend": runtime.backend, "device": runtime.device,
        "compute_precision": runtime.precision, "float_op_share": runtime.extra.get("float_op_share"),
    })
    return row


def _onnx_params(path: Path) -> float | None:
    if path.suffix != ".onnx":
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = ["format", "status", "e2e_mean_ms", "e2e_p50_ms", "e2e_p95_ms", "raw_mean_ms", "e2e_over_raw", "f1",
            "precision", "recall", "penalized_iou", "boundary_iou", "map50_95", "map50", "params_m", "size_mb",
            "compute_precision", "float_op_share"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    notes = [f"- {r['format']}: {r['status']}: {r['reason']}" for r in rows if r.get("reason")]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_reports(rows: list[dict[str, Any]], machine: dict[str, Any], out: Any) -> None:
    """bench.csv/.md/.json/.png into `out`: an OutputFolder, or a folder path (one is made for it)."""
    from dfineseg.utils.outputs import OutputFolder

    folder = out if isinstance(out, OutputFolder) else OutputFolder(out, command="bench")
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    folder.write_text("bench.csv", buf.getvalue())
    table = markdown_table(rows)
    folder.write_text("bench.md",
        f"# dfineseg bench\n\nMachine: {describe(machine)}\n\n{table}\n\n"
        "Latency in ms per image at batch 1 (end-to-end = preprocess + forward + postprocess with masks at "
        "original resolution; raw = forward only). F1/precision/recall/penalised IoU at the fixed threshold "
        "(masks for segment models), mAP at conf 0.01.\n")
    bench_json = folder.write_text("bench.json", json.dumps({"machine": machine, "rows": rows}, indent=2, default=str))
    out_dir = folder.root
    print(f"\nMachine: {describe(machine)}\n{table}\n\nwrote {out_dir}/bench.csv, bench.md, bench.json, bench.png")
    folder.write_bytes("bench.png", _plot_png([bench_json]))


def plot_runs(json_paths: list[Path], out_png: Path) -> Path:
    """Latency vs F1, one point per format and run (several runs can be combined into one plot)."""
    from dfineseg.utils.outputs import OutputFolder

    out_png = Path(out_png)
    return OutputFolder(out_png.parent, command="bench").write_bytes(out_png.name, _plot_png(json_paths))


def _plot_png(json_paths: list[Path]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for path in json_paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        run = Path(path).parent.name
        ok = [r for r in data["rows"] if r.get("status") == "ok"]
        for r in ok:
            ax.scatter(r["e2e_mean_ms"], r["f1"], s=40)
            ax.annotate(f"{run}:{r['format']}" if len(json_paths) > 1 else r["format"],
                        (r["e2e_mean_ms"], r["f1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("end-to-end latency per image (ms)")
    ax.set_ylabel("F1 at the fixed threshold")
    ax.set_title("dfineseg: latency vs F1")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
