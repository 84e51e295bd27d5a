"""Runner for Ultralytics YOLO segmentation models a user exported themselves (ONNX or OpenVINO).

Ultralytics is never a dependency: this reads the exported graph directly. The end-to-end (NMS-free)
segment head of YOLO26 exports two outputs:

- detections (B, K, 6 + M): x1, y1, x2, y2 in input pixels, score, class, M mask coefficients
- prototypes (B, M, H/4, W/4)

Mask logits of detection k are `coeffs_k . prototypes`, which is exactly our exported-graph contract
(`mask_embed` . `mask_features` at 1/4 of the input), so the peer goes through the same `postprocess` (the
product taken only for kept detections, inside their boxes) and the same metric code as our own models,
with the same letterbox resizing that Ultralytics' predictor uses.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.errors import UserError
from dfineseg.infer.graph import MASK_EMBED, MASK_FEATURES


class PeerModelError(UserError):
    pass


class YoloSegRunner:
    """`forward(batch)` returns our graph outputs; `resize` is letterbox as in Ultralytics."""

    resize = "letterbox"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise PeerModelError(f"peer model not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            inp = self._session.get_inputs()[0]
            self._input_name = inp.name
            shape = inp.shape
            self._run = lambda x: self._session.run(None, {self._input_name: x})
            self.backend_name, self.precision = "onnxruntime", "f32"
        elif suffix == ".xml":
            import openvino as ov

            core = ov.Core()
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = core.compile_model(str(self.path), "CPU", config)
            self._request = compiled.create_infer_request()
            shape = list(compiled.inputs[0].get_partial_shape().to_shape())
            self._run = lambda x: [self._request.infer({0: x})[out] for out in compiled.outputs]
            self.backend_name, self.precision = "openvino", str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        else:
            raise PeerModelError(f"{self.path}: peer models must be .onnx or OpenVINO .xml")
        try:
            self.input_hw = (int(shape[2]), int(shape[3]))
        except (TypeError, ValueError):
            raise PeerModelError(f"{self.path}: export the peer with a static input size (got {shape})") from None

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        return yolo_end_to_end_to_contract(outputs, self.input_hw, self.path)


def yolo_end_to_end_to_contract(outputs: list[np.ndarray], input_hw: tuple[int, int], path: Path | str = "peer") -> dict[str, np.ndarray]:
    """(detections (B,K,6+M), prototypes (B,M,h,w)) -> scores, labels, boxes (normalised xyxy), and the mask
    coefficients as `mask_embed` (B,K,M) with the prototypes as `mask_features` (B,h,w,M)."""
    dets = next((o for o in outputs if o.ndim == 3), None)
    protos = next((o for o in outputs if o.ndim == 4), None)
    if dets is None or dets.shape[-1] < 6:
        raise PeerModelError(
            f"{path}: expected an end-to-end YOLO output (B, K, 6+M); got shapes {[o.shape for o in outputs]}. "
            "Export the Ultralytics model with its end-to-end (NMS-free) head"
        )
    h, w = input_hw
    boxes = dets[..., :4] / np.array([w, h, w, h], dtype=np.float32)
    out = {
        "scores": dets[..., 4].astype(np.float32),
        "labels": dets[..., 5].astype(np.int64),
        "boxes": boxes.astype(np.float32),
    }
    if protos is not None:
        coeffs = dets[..., 6:]
        b, m, ph, pw = protos.shape
        if coeffs.shape[-1] != m:
            raise PeerModelError(f"{path}: {coeffs.shape[-1]} mask coefficients but {m} prototypes")
        out[MASK_EMBED] = np.ascontiguousarray(coeffs, dtype=np.float32)
        out[MASK_FEATURES] = np.ascontiguousarray(protos.transpose(0, 2, 3, 1), dtype=np.float32)
    return out


# ---------------------------------------------------------------- raw latency against the peers (issue 19)
# `python -m dfineseg.benchmarks.peers`: our OpenVINO IRs exactly as `dfineseg export format=openvino int8=true`
# writes them (openvino/ and openvino_int8/ beside the checkpoint) and the peers' float and INT8 IRs, timed in
# one interleaved loop (every model takes its turn each round, so a busy machine slows all alike), batch 1,
# raw forward on one fixed random input: pre/post-processing is not timed (`dfineseg bench peers=` times the
# whole pipeline and the metric).
LATENCY_COLUMNS = (
    # column: (which IR, precision hint; None = the device's default, bf16 on CPUs with AVX512-BF16/AMX)
    ("f32", "float", "f32"),
    ("bf16", "float", "bf16"),
    ("int8", "int8", None),
    ("int8_f32", "int8", "f32"),  # what a CPU without bf16 runs (an Intel N150): the float islands in f32
)


def _split_labelled(text: str, flag: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label.strip() or not value.strip():
        raise PeerModelError(f"{flag} takes LABEL=VALUE, got {text!r}")
    return label.strip(), value.strip()


def our_irs(checkpoint: str | Path) -> tuple[Path, Path]:
    """(float IR, INT8 IR) that `dfineseg export weights=CKPT format=openvino int8=true` wrote beside CKPT."""
    ckpt = Path(checkpoint)
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    pair = (folder / "openvino" / "model.xml", folder / "openvino_int8" / "model.xml")
    missing = [str(p) for p in pair if not p.is_file()]
    if missing:
        raise PeerModelError(
            f"{checkpoint}: no exported IR at {', '.join(missing)}; run "
            f"`dfineseg export weights={ckpt} format=openvino int8=true` first (this measures what it writes)"
        )
    return pair


def peer_irs(value: str) -> tuple[Path, Path]:
    """'FLOAT.xml,INT8.xml' (ONNX for the float model is read by OpenVINO too)."""
    parts = [Path(p.strip()) for p in value.split(",") if p.strip()]
    if len(parts) != 2:
        raise PeerModelError(f"--peer wants LABEL=FLOAT_IR,INT8_IR (two files), got {value!r}")
    for p in parts:
        if not p.is_file():
            raise PeerModelError(f"peer model not found: {p}")
    return parts[0], parts[1]


def cpu_has_bf16(core: Any) -> bool:
    try:
        return "BF16" in [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # noqa: BLE001  (a plugin without the property: bf16 is reported as not measured)
        return False


def read_batch_one(core: Any, path: str | Path) -> tuple[Any, np.ndarray]:
    """(the model with batch 1, one fixed random input for it): a dynamic batch is set to 1; a dynamic image
    size is refused, since latency depends on it."""
    model = core.read_model(str(path))
    shape = model.inputs[0].get_partial_shape()
    if not shape.is_static and shape.rank.is_static and all(d.is_static for d in list(shape)[1:]):
        model.reshape([1, *[d.get_length() for d in list(shape)[1:]]])
        shape = model.inputs[0].get_partial_shape()
    if not shape.is_static:
        raise PeerModelError(f"{path}: export it with a static input size (got {shape}); batch 1 is timed")
    return model, np.random.default_rng(0).random(list(shape.to_shape()), dtype=np.float32)


def _compile(core: Any, path: Path, hint: str | None, threads: int) -> tuple[Any, np.ndarray]:
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    model, x = read_batch_one(core, path)
    return core.compile_model(model, "CPU", config), x


def measure_latency(models: dict[str, tuple[Path, Path]], runs: int, warmup: int, threads: int,
                    columns: tuple[tuple[str, str, str | None], ...] = LATENCY_COLUMNS) -> list[dict[str, Any]]:
    """One row per model: median ms per column, the INT8 model's compute precision and float share."""
    import openvino as ov

    from dfineseg.benchmarks.harness import interleaved_times_ms
    from dfineseg.infer.backends.openvino import compiled_precision

    core = ov.Core()
    columns = tuple(c for c in columns if c[2] != "bf16" or cpu_has_bf16(core))
    requests: dict[tuple[str, str], Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label, (float_ir, int8_ir) in models.items():
        rows[label] = {"model": label, "float_ir": str(float_ir), "int8_ir": str(int8_ir)}
        for column, which, hint in columns:
            compiled, x = _compile(core, float_ir if which == "float" else int8_ir, hint, threads)
            request = compiled.create_infer_request()
            requests[(label, column)] = (request, x)
            if which == "int8":
                precision, share = compiled_precision(compiled)
                rows[label][f"{column}_compute"] = precision
                rows[label][f"{column}_float_op_share"] = share
    runners = {key: (lambda request=request, x=x: request.infer({0: x})) for key, (request, x) in requests.items()}
    for (label, column), times in interleaved_times_ms(runners, runs, warmup).items():
        rows[label][f"{column}_ms"] = statistics.median(times)
        rows[label][f"{column}_rounds_ms"] = times  # per round, for the paired ratios
    for row in rows.values():
        if row.get("int8_f32_ms"):
            row["int8_speedup_vs_f32"] = row["f32_ms"] / row["int8_f32_ms"]
    return list(rows.values())


def paired_round_ratios(ours_ms: list[float], peer_ms: list[float]) -> dict[str, float]:
    """Ratios of the two models' times taken in the same round (same machine state): their median, 10th and
    90th percentiles, and the median over the quietest quarter of rounds (those where the peer ran at or below
    its own 25th percentile). On a shared VM the machine's speed drifts by tens of percent within minutes and
    models do not slow down alike (a memory-bound one more), so the spread says how much the ratio depends on the
    machine's state, and the quiet quarter is the ratio in the run's least loaded rounds (a run spent wholly in a
    loaded state has no unloaded rounds to show: compare runs made at different times)."""
    ours_a, peer_a = np.asarray(ours_ms, dtype=np.float64), np.asarray(peer_ms, dtype=np.float64)
    if ours_a.shape != peer_a.shape or not ours_a.size:
        raise ValueError(f"paired ratios need the same rounds for both models, got {ours_a.size} and {peer_a.size}")
    per_round = ours_a / peer_a
    quiet = per_round[peer_a <= np.percentile(peer_a, 25)]
    return {"median": float(np.median(per_round)), "p10": float(np.percentile(per_round, 10)),
            "p90": float(np.percentile(per_round, 90)), "quiet": float(np.median(quiet))}


def pair_ratios(rows: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """ours / peer per column (<= 1.0: ours is at least as fast): the ratio of the medians, and where the per-round
    times are known, the paired per-round statistics (`paired_round_ratios`) as `<column>_rounds`."""
    by_label = {r["model"]: r for r in rows}
    out = []
    for ours, peer in pairs:
        if ours not in by_label or peer not in by_label:
            raise PeerModelError(f"--pair {ours}:{peer}: both labels must name a measured model "
                                 f"({', '.join(by_label)})")
        ratio: dict[str, Any] = {"pair": f"{ours} / {peer}"}
        for column, *_ in LATENCY_COLUMNS:
            a, b = by_label[ours].get(f"{column}_ms"), by_label[peer].get(f"{column}_ms")
            ratio[column] = (a / b) if a and b else None
            rounds = by_label[ours].get(f"{column}_rounds_ms"), by_label[peer].get(f"{column}_rounds_ms")
            if rounds[0] and rounds[1]:
                ratio[f"{column}_rounds"] = paired_round_ratios(*rounds)
        out.append(ratio)
    return out


def latency_markdown(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    def ms(v: Any) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    lines = ["| model | f32 ms | bf16 ms | INT8 ms (default hint) | INT8 ms (f32 hint) | INT8 computes in | "
             "float share of convs/matmuls | f32 / INT8 (f32 hint) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r.get("int8_float_op_share")
        lines.append(
            f"| {r['model']} | {ms(r.get('f32_ms'))} | {ms(r.get('bf16_ms'))} | {ms(r.get('int8_ms'))} | "
            f"{ms(r.get('int8_f32_ms'))} | {r.get('int8_compute', 'n/a')} | "
            f"{'n/a' if share is None else f'{share:.3f}'} | {ms(r.get('int8_speedup_vs_f32')).replace('n/a', '-')}x |")
    columns = ("f32", "bf16", "int8", "int8_f32")
    if ratios:
        lines += ["", "| ours / peer (ratio of medians) | f32 | bf16 | INT8 (default hint) | INT8 (f32 hint) |",
                  "|---|---|---|---|---|"]
        for q in ratios:
            cells = " | ".join("n/a" if q[c] is None else f"{q[c]:.2f}" for c in columns)
            lines.append(f"| {q['pair']} | {cells} |")

        def paired(q: dict[str, Any], c: str) -> str:
            r = q.get(f"{c}_rounds")
            return "n/a" if r is None else f"{r['median']:.2f} [{r['p10']:.2f}-{r['p90']:.2f}], quiet {r['quiet']:.2f}"

        lines += ["", "Per round (both models timed in the same round): median [10th-90th percentile], and the median "
                  "over the quietest quarter of rounds (the peer at or below its 25th percentile). A wide range "
                  "means the ratio depends on how loaded the machine is.", "",
                  "| ours / peer, per round | f32 | bf16 | INT8 (default hint) | INT8 (f32 hint) |", "|---|---|---|---|---|"]
        for q in ratios:
            lines.append(f"| {q['pair']} | " + " | ".join(paired(q, c) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from dfineseg.benchmarks.machine import machine_info
    from dfineseg.utils.outputs import OutputFolder

    ap = argparse.ArgumentParser(
        prog="python -m dfineseg.benchmarks.peers",
        description="Raw OpenVINO latency of our exported models and the peers' (YOLO26-seg) IRs, interleaved: "
        "f32, bf16, INT8 with the device's default hint and with f32 (an N150), plus ours/peer ratios.")
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL=CHECKPOINT",
                    help="a checkpoint whose openvino/ and openvino_int8/ exports lie beside it")
    ap.add_argument("--peer", action="append", default=[], metavar="LABEL=FLOAT_IR,INT8_IR")
    ap.add_argument("--pair", action="append", default=[], metavar="OURS:PEER", help="labels to compare")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/peer_latency")
    args = ap.parse_args(argv)
    models: dict[str, tuple[Path, Path]] = {}
    for text in args.ours:
        label, value = _split_labelled(text, "--ours")
        models[label] = our_irs(value)
    for text in args.peer:
        label, value = _split_labelled(text, "--peer")
        models[label] = peer_irs(value)
    if not models:
        ap.error("give at least one --ours or --peer")
    pairs = []
    for text in args.pair:
        ours, sep, peer = text.partition(":")
        if not sep:
            ap.error(f"--pair takes OURS:PEER, got {text!r}")
        pairs.append((ours.strip(), peer.strip()))
    folder = OutputFolder(args.out, command="peers", protect=[p for pair in models.values() for p in pair])
    folder.check_all(["peer_latency.md", "peer_latency.json"])
    rows = measure_latency(models, args.runs, args.warmup, args.threads)
    ratios = pair_ratios(rows, pairs)
    table = latency_markdown(rows, ratios)
    print(table)
    report = {"machine": machine_info(), "runs": args.runs, "threads": args.threads, "rows": rows, "ratios": ratios}
    folder.write_bytes("peer_latency.md", table.encode())
    folder.write_bytes("peer_latency.json", json.dumps(report, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
