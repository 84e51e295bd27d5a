"""Where an OpenVINO model's time goes: per-operation profile, summed by module and by kernel precision.

    python -m dfineseg.benchmarks.ov_profile runs/x/openvino_int8/model.xml --hint f32 --top 25

OpenVINO's own counters (`PERF_COUNT`) over `--runs` forwards of one fixed random input, batch 1; the
module is the first part of the operation's name (the torch module path of the export: backbone,
encoder, decoder, ...; the mask head's modules sit at the top level of the deploy graph) or `--depth` parts
of it. The kernel precision is the last part of OpenVINO's execution type (`brgconv_avx512_1x1_I8` -> I8,
`jit_avx512_f32` -> f32), i.e. what the CPU really ran. The sum of the operations is close to, not equal
to, the wall time of a forward (`dfineseg.benchmarks.peers` times that).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Profile:
    total_ms: float
    by_module: Counter = field(default_factory=Counter)
    by_precision: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    kinds: dict[str, tuple[str, str]] = field(default_factory=dict)  # operation -> (type, execution type)


def module_of(name: str, depth: int = 1) -> str:
    parts = [p for p in name.split("/") if p]
    return "/".join(parts[:depth]) if len(parts) > 1 else "(graph)"


def kernel_precision(exec_type: str) -> str:
    last = exec_type.rsplit("_", 1)[-1] if exec_type else ""
    return last.lower() if last.lower() in {"f32", "bf16", "f16", "i8", "u8", "i32", "i64"} else (last.lower() or "?")


def profile(path: str | Path, hint: str | None = "f32", runs: int = 20, warmup: int = 3, threads: int = 2,
            depth: int = 1) -> Profile:
    import openvino as ov

    from dfineseg.benchmarks.peers import read_batch_one

    config: dict[str, object] = {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    core = ov.Core()
    model, x = read_batch_one(core, path)
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for _ in range(warmup):
        request.infer({0: x})
    out = Profile(total_ms=0.0)
    for _ in range(runs):
        request.infer({0: x})
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1000.0 / runs
            if ms <= 0.0:
                continue
            out.total_ms += ms
            out.by_module[module_of(info.node_name, depth)] += ms
            out.by_precision[kernel_precision(info.exec_type)] += ms
            out.by_operation[info.node_name] += ms
            out.kinds[info.node_name] = (info.node_type, info.exec_type)
    return out


def render(p: Profile, top: int) -> str:
    lines = [f"sum of operations: {p.total_ms:.2f} ms", "", "| module | ms | share |", "|---|---|---|"]
    lines += [f"| {m} | {ms:.2f} | {ms / p.total_ms:.1%} |" for m, ms in p.by_module.most_common()]
    lines += ["", "| kernel precision | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {ms:.2f} | {ms / p.total_ms:.1%} |" for k, ms in p.by_precision.most_common()]
    lines += ["", "| operation | type | kernel | ms |", "|---|---|---|---|"]
    for name, ms in p.by_operation.most_common(top):
        kind, kernel = p.kinds[name]
        lines.append(f"| {name} | {kind} | {kernel} | {ms:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfineseg.benchmarks.ov_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an OpenVINO .xml (or .onnx)")
    ap.add_argument("--hint", default="f32", help="INFERENCE_PRECISION_HINT; 'default' leaves the device's choice")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1, help="name parts that make a module (2: decoder/layers.0)")
    ap.add_argument("--top", type=int, default=25, help="slowest operations listed")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        ap.error(f"model not found: {args.model}")
    hint = None if args.hint == "default" else args.hint
    print(render(profile(args.model, hint, args.runs, threads=args.threads, depth=args.depth), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
