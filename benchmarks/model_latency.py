"""Model cost: parameters, GFLOPs and raw CPU forward latency (torch, OpenVINO f32/bf16/INT8) per size,
task and mask-head width.

    python -m dfineseg.benchmarks.model_latency --sizes n s --runs 100 --out runs/model_latency

What is timed: the exported graph (`DeployModel`, top-100, masks for those 100 only) on one fixed
1x3xHxW input, batch 1, after warm-up; the number is the median of `--runs` forwards. Weights are random
(latency does not depend on them). INT8 = `nncf.quantize` calibrated on `--calib` random images.
GFLOPs are counted by torch's FlopCounterMode on the deploy forward (2 FLOPs per multiply-add; grid_sample
and element-wise ops not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

# On a shared CPU, spinning OpenMP workers of a 2-thread torch wait on each other for seconds; passive
# waiting keeps torch timings sane (set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfineseg.benchmarks.harness import interleaved_median_ms  # noqa: E402
from dfineseg.infer.graph import INPUT_NAME, output_names  # noqa: E402
from dfineseg.model import DeployModel, DFINESeg, count_parameters  # noqa: E402
from dfineseg.model.runner import deploy_module, module_forward  # noqa: E402

VARIANTS = {
    # name: (task, fpn_channels, mask_channels, depthwise 1/4 block, norm)
    "detect": ("detect", 0, 0, True, "bn"),
    "seg-64": ("segment", 64, 64, True, "bn"),
    "seg-128": ("segment", 128, 128, True, "bn"),
    "seg-256": ("segment", 256, 256, True, "bn"),
    "seg-64-gn": ("segment", 64, 64, True, "gn"),
    "seg-256-paper": ("segment", 256, 256, False, "gn"),  # the D-FINE-seg paper's head
    # The DINOv2 ViT/14 backbones (seed 003) in place of HGNetv2, default head; LoRA merged away at export.
    "seg-64-dinov2_s": ("segment", 64, 64, True, "bn", {"backbone": "dinov2_s"}),
    "seg-64-dinov2_b": ("segment", 64, 64, True, "bn", {"backbone": "dinov2_b"}),
    # The seed techniques' inference-time parts (issue 17), default head: their deploy cost.
    "seg-64-dense": ("segment", 64, 64, True, "bn", {"memory_fusion": "dense"}),
    "seg-64-mask_query": ("segment", 64, 64, True, "bn", {"query_selection": "mask"}),
    "seg-64-di": ("segment", 64, 64, True, "bn", {"decoder_balance": "di"}),
}
# Variants left out of the default --variants (opt in by name).
OPT_IN = ("dinov2", "dense", "mask_query", "-di")


@dataclass
class Row:
    size: str
    variant: str
    params_m: float
    gflops: float
    torch_ms: float | None = None
    ov_f32_ms: float | None = None
    ov_bf16_ms: float | None = None
    ov_int8_ms: float | None = None


def build(size: str, variant: str) -> DFINESeg:
    task, fpn, mask, dw, norm, *rest = VARIANTS[variant]
    extra = rest[0] if rest else {}  # DFINESeg keywords: backbone, a seed technique's switch
    torch.manual_seed(0)
    if task == "detect":
        return DFINESeg(size, 80, "detect").eval()
    return DFINESeg(size, 80, "segment", fpn_channels=fpn, mask_channels=mask, depthwise_mask=dw,
                    mask_norm=norm, **extra).eval()


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, segment: bool) -> None:
    names = list(output_names("segment" if segment else "detect"))
    # The TorchScript exporter (dynamo=False) handles this graph in seconds; opset 17 keeps LayerNorm native.
    torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=names, opset_version=17,
                      dynamo=False)


def ov_runner(onnx_path: Path, x: np.ndarray, prec: str, threads: int, calib: int) -> Callable[[], object]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    if prec == "int8":
        import nncf

        rng = np.random.default_rng(0)
        data = [rng.random(x.shape, dtype=np.float32) for _ in range(calib)]
        model = nncf.quantize(model, nncf.Dataset(data), subset_size=calib)
        config = {"INFERENCE_NUM_THREADS": threads}
    else:
        # Pinned explicitly: on AVX512-BF16 CPUs OpenVINO would otherwise run bf16 when asked for nothing.
        config = {"INFERENCE_PRECISION_HINT": prec, "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return lambda: request.infer({0: x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["n", "s"])
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if not any(o in v for o in OPT_IN)],
                    choices=list(VARIANTS))
    ap.add_argument("--count-sizes", nargs="+", default=["n", "s", "m", "l", "x"],
                    help="sizes whose params/GFLOPs are listed (no latency)")
    ap.add_argument("--imgsz", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--torch-runs", type=int, default=None, help="default: --runs")
    ap.add_argument("--bf16-runs", type=int, default=None,
                    help="default: --runs (bf16 is emulated, hence slow, on CPUs without AVX512-BF16/AMX)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=20)
    ap.add_argument("--formats", nargs="+", default=["torch", "f32", "bf16", "int8"],
                    choices=["torch", "f32", "bf16", "int8"])
    ap.add_argument("--out", type=Path, default=Path("runs/model_latency"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    h, w = args.imgsz
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    tmp = Path(tempfile.mkdtemp(prefix="dfineseg-latency-"))  # the ONNX files; removed when main() ends
    try:
        rows = _measure(args, x, xn, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(args, rows, h, w)


def _measure(args: argparse.Namespace, x: torch.Tensor, xn: np.ndarray, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    for size in args.count_sizes:
        for variant in ("detect", "seg-64") if size not in args.sizes else ():
            model = build(size, variant)
            rows.append(Row(size, variant, count_parameters(model) / 1e6, gflops(DeployModel(model), x)))
    field = {"torch": "torch_ms", "f32": "ov_f32_ms", "bf16": "ov_bf16_ms", "int8": "ov_int8_ms"}
    for size in args.sizes:
        deploys: dict[str, DeployModel] = {}
        size_rows: dict[str, Row] = {}
        for variant in args.variants:
            model = build(size, variant)
            deploys[variant] = deploy_module(model, topk=100)
            size_rows[variant] = Row(size, variant, count_parameters(model) / 1e6, gflops(deploys[variant], x))
        onnx_paths = {}
        if any(f != "torch" for f in args.formats):
            for variant, deploy in deploys.items():
                onnx_paths[variant] = tmp / f"{size}-{variant}.onnx"
                export_onnx(deploy, x, onnx_paths[variant], deploy.model.task == "segment")
        for fmt in args.formats:
            if fmt == "torch":
                # The shared PyTorch runner (numpy in, graph outputs out), as the torch backend runs it.
                forwards = {v: module_forward(d, output_names(d.model.task)) for v, d in deploys.items()}
                runners = {v: (lambda f=f: f(xn)) for v, f in forwards.items()}
                res = interleaved_median_ms(runners, args.torch_runs or args.runs, args.warmup)
            else:
                runners = {v: ov_runner(p, xn, fmt, args.threads, args.calib) for v, p in onnx_paths.items()}
                runs = (args.bf16_runs or args.runs) if fmt == "bf16" else args.runs
                res = interleaved_median_ms(runners, runs, args.warmup)
                del runners
            for variant, ms in res.items():
                setattr(size_rows[variant], field[fmt], ms)
            print(size, fmt, {k: round(v, 1) for k, v in res.items()}, flush=True)
        rows.extend(size_rows.values())
    return rows


def _report(args: argparse.Namespace, rows: list[Row], h: int, w: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": _cpu_name(),
            "imgsz": [h, w], "runs": args.runs, "torch_runs": args.torch_runs or args.runs,
            "bf16_runs": args.bf16_runs or args.runs, "threads": args.threads, "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg": os.getloadavg()}
    (args.out / "model_latency.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                                            indent=1))
    table = render(rows)
    (args.out / "model_latency.md").write_text(table)
    print(json.dumps(meta))
    print(table)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[Row]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    base = {r.size: r for r in rows if r.variant == "detect"}
    lines = ["| size | variant | params M | GFLOPs | torch ms | OV f32 ms | OV bf16 ms | OV int8 ms | "
             "bf16 / detect | int8 / detect |", "|" + "---|" * 10]
    for r in rows:
        d = base.get(r.size)
        rb = f"{r.ov_bf16_ms / d.ov_bf16_ms:.2f}x" if d and r.ov_bf16_ms and d.ov_bf16_ms else "-"
        ri = f"{r.ov_int8_ms / d.ov_int8_ms:.2f}x" if d and r.ov_int8_ms and d.ov_int8_ms else "-"
        lines.append(f"| {r.size} | {r.variant} | {r.params_m:.2f} | {r.gflops:.1f} | {f(r.torch_ms)} | "
                     f"{f(r.ov_f32_ms)} | {f(r.ov_bf16_ms)} | {f(r.ov_int8_ms)} | {rb} | {ri} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
