"""GPU check: training steps per precision, DDP, and inference latency on one CUDA machine, in minutes.

    python -m dfineseg.benchmarks.gpu_check                      # CUDA; default settings, < 5 min on an H100/H200
    python -m dfineseg.benchmarks.gpu_check --device cpu --quick # the CPU smoke run the tests use

What it measures (random weights, synthetic inputs; speed and memory do not depend on either):
1. Training steps of each size (default N and S, 640x640, batch 8) without AMP (fp32), with bf16 autocast and
   with fp16 autocast + GradScaler, through the trainer's own pieces: `build_model`, `build_criterion` (loss
   in fp32), `build_optimizer` (AdamW groups), gradient clipping and the EMA update. Warm-up steps, then timed
   steps (synchronised): seconds per step, images/s, peak `torch.cuda.max_memory_allocated` (reset per case).
2. DDP: a few steps through `DistributedDataParallel` over NCCL at world size 1 on the GPU, and over gloo with
   2 CPU processes (`torch.multiprocessing.spawn`); each reports ok or the error. The gloo run also checks
   that both ranks end with identical weights (gradients were averaged). NCCL across several GPUs stays
   unverified on a one-GPU machine, and the output says so.
3. Latency at batch 1 (paper protocol, dfine-facts section 9): the raw forward of the exported-graph module
   (`deploy_module`, top-100, a tensor already on the device, synchronised), the numpy runner
   (`module_forward`, host copies included), and end-to-end (uint8 image in memory -> `preprocess` ->
   forward -> `postprocess` with masks at the original resolution). Medians after warm-up. Random weights
   score below the 0.5 threshold, so end-to-end is also timed with every top-100 query kept (conf 0): the
   mask work of a busy image. fp32, and fp16 (`model.half()`) on CUDA.

Prints one table (stdout; progress goes to stderr) and writes JSON (`--out`); an existing `--out` that is not
an earlier gpu_check result is never overwritten. Imports nothing that needs pydantic, pycocotools,
faster-coco-eval, OpenVINO or NNCF (`dfineseg.config` is not imported: the configuration is a stand-in
holding the schema's defaults, which the tests compare with `dfineseg.config.Config()`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dfineseg.benchmarks.gpu_check_ddp import ddp_case
from dfineseg.benchmarks.gpu_check_setup import (
    DDP_RESERVE_S,
    DEFAULT_OUT,
    NORMAL,
    NUM_CLASSES,
    PRECISIONS,
    QUICK,
    SCHEMA,
    Clock,
    OutPathError,
    Settings,
    _release,
    _sync,
    check_out_path,
    failed,
    log,
    loss_cfg,
    model_cfg,
    row,
    skipped,
    synthetic_batch,
    train_cfg,
)


def precision_skip_reason(precision: str, device: Any) -> str | None:
    import torch

    if device.type != "cuda":
        if precision == "amp-fp16":
            return "fp16 autocast + GradScaler is a CUDA recipe (the trainer's AMP runs on CUDA only)"
        return None
    if precision == "amp-bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def train_case(model: Any, init_state: dict[str, Any], size: str, precision: str, s: Settings, device: Any,
               images: Any, targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Warm-up + timed training steps of one model at one precision; the weights start from `init_state`."""
    import resource

    import torch

    from dfineseg.loss.criterion import build_criterion, total_loss
    from dfineseg.train.ema import ModelEMA
    from dfineseg.train.optim import build_optimizer

    case = f"{size} {precision}"
    fields = {"size": size, "precision": precision, "imgsz": s.imgsz, "batch": s.batch}
    reason = precision_skip_reason(precision, device)
    if reason:
        return skipped("train", case, reason, **fields)
    tcfg = train_cfg()
    _release(device)
    model.load_state_dict(init_state)
    model.train()
    criterion = build_criterion(loss_cfg(), NUM_CLASSES, model.task)
    optimizer = build_optimizer(model, tcfg, size)
    ema = ModelEMA(model, tcfg.ema_decay, tcfg.ema_warmup, horizon=tcfg.ema_horizon,
                   total_steps=s.warmup + s.steps) if tcfg.ema else None
    amp_dtype = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp-fp16")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    times, losses, nonfinite, skipped_steps = [], [], 0, 0
    for i in range(s.warmup + s.steps):
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            outputs = model(images, targets)
        loss = total_loss(criterion(outputs, targets))
        finite = bool(torch.isfinite(loss).item())  # the trainer reads it too (one sync per step)
        if finite:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, tcfg.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        nonfinite += not finite
        if scale_before is not None and scaler.get_scale() < scale_before:
            skipped_steps += 1  # fp16: the scaler found inf/NaN gradients and skipped the step
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (not per case)"
    del optimizer, ema, scaler, outputs, loss
    return row("train", case, **fields, steps=s.steps, warmup=s.warmup, step_s_median=step_s, step_s_min=min(times),
               images_per_s=s.batch / step_s, peak_mem_gib=peak, peak_mem_kind=peak_kind, losses=losses,
               nonfinite_losses=nonfinite, scaler_skipped_steps=skipped_steps)


# ------------------------------------------------------------------ latency
def median_ms(fn: Callable[[], Any], runs: int, warmup: int, device: Any) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def latency_case(model: Any, size: str, precision: str, s: Settings, device: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from dfineseg.infer.graph import output_names
    from dfineseg.infer.postprocess import postprocess
    from dfineseg.infer.preprocess import preprocess
    from dfineseg.model.runner import deploy_module, module_forward

    fields = {"size": size, "precision": precision, "imgsz": s.imgsz, "batch": 1, "orig_hw": list(s.orig_hw),
              "topk": 100, "runs": s.lat_runs, "warmup": s.lat_warmup}
    if precision == "fp16" and device.type != "cuda":
        return skipped("latency", f"{size} fp16", "half-precision PyTorch runs on CUDA only here", **fields)
    half = precision == "fp16"
    _release(device)
    deploy = deploy_module(model, topk=100, device=device, half=half)  # fp16 converts the model in place: last
    x = torch.rand(1, 3, s.imgsz, s.imgsz, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.half() if half else x
    forward = module_forward(deploy, output_names(model.task), device, half)
    image = np.random.default_rng(0).integers(0, 256, (*s.orig_hw, 3), dtype=np.uint8)
    batch, _ = preprocess([image], s.imgsz)
    counts: dict[float, int] = {}

    def raw() -> None:
        with torch.inference_mode():
            deploy(x)

    def end_to_end(conf: float) -> Callable[[], None]:
        def run() -> None:
            b, m = preprocess([image], s.imgsz)
            counts[conf] = len(postprocess(forward(b), m, conf=conf)[0])

        return run

    res = {
        "raw_ms": median_ms(raw, s.lat_runs, s.lat_warmup, device),
        "runner_ms": median_ms(lambda: forward(batch), s.lat_runs, s.lat_warmup, device),
        "e2e_ms": median_ms(end_to_end(0.5), s.lat_runs, s.lat_warmup, device),
        "e2e_all_kept_ms": median_ms(end_to_end(0.0), s.lat_runs, s.lat_warmup, device),
    }
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row("latency", f"{size} {precision}", **fields, **res, detections_at_0_5=counts[0.5],
               detections_all_kept=counts[0.0], peak_mem_gib=mem)


# ------------------------------------------------------------------ the run
def run_checks(s: Settings, clock: Clock) -> list[dict[str, Any]]:
    import copy

    import torch

    from dfineseg.model.dfine import build_model

    device = torch.device(s.device)
    rows: list[dict[str, Any]] = []
    for size in s.sizes:
        reason = clock.spent_reason(DDP_RESERVE_S)
        if reason:
            rows.append(skipped("train", f"{size} (all)", reason, size=size))
            continue
        log(f"size {size}: building the model")
        torch.manual_seed(0)
        try:
            model = build_model(model_cfg(size), NUM_CLASSES).to(device)
            images, targets = synthetic_batch(s.batch, s.imgsz, device)
        except Exception as exc:  # noqa: BLE001
            rows.append(failed("train", f"{size} (build)", exc, size=size))
            continue
        init_state = copy.deepcopy(model.state_dict())
        for precision in PRECISIONS:
            reason = clock.spent_reason(DDP_RESERVE_S)
            if reason:
                rows.append(skipped("train", f"{size} {precision}", reason, size=size, precision=precision))
                continue
            log(f"train {size} {precision}")
            try:
                rows.append(train_case(model, init_state, size, precision, s, device, images, targets))
            except Exception as exc:  # noqa: BLE001
                rows.append(failed("train", f"{size} {precision}", exc, size=size, precision=precision))
            model.zero_grad(set_to_none=True)
        del images, targets
        model.load_state_dict(init_state)  # fp16 steps may have left non-finite weights
        for precision in ("fp32", "fp16"):  # fp16 last: it converts the model in place
            reason = clock.spent_reason(DDP_RESERVE_S)
            if reason:
                rows.append(skipped("latency", f"{size} {precision}", reason, size=size, precision=precision))
                continue
            log(f"latency {size} {precision}")
            try:
                rows.append(latency_case(model, size, precision, s, device))
            except Exception as exc:  # noqa: BLE001
                rows.append(failed("latency", f"{size} {precision}", exc, size=size, precision=precision))
        del model, init_state
        _release(device)
    if device.type == "cuda":
        log("ddp nccl")
        rows.append(ddp_case("nccl", 1, s, device, clock))
        gpus = torch.cuda.device_count() - (device.index or 0)
        if gpus >= 2:
            log("ddp nccl, 2 GPUs")
            rows.append(ddp_case("nccl", 2, s, device, clock))
        else:
            rows.append(skipped("ddp", "nccl, several GPUs", "unverified: this machine has one GPU",
                                backend="nccl"))
    else:
        rows.append(skipped("ddp", "nccl", "no CUDA device (--device cpu)", backend="nccl"))
    log("ddp gloo")
    rows.append(ddp_case("gloo", 2, s, device, clock))
    return rows


def summary(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return ""
    if r["check"] == "train":
        text = (f"{r['images_per_s']:.1f} img/s, {r['step_s_median'] * 1000:.0f} ms/step, peak {r['peak_mem_gib']:.2f} GiB"
                f"{' RSS' if r['peak_mem_kind'].startswith('process') else ''}")
        if r["nonfinite_losses"] or r["scaler_skipped_steps"]:
            text += f", {r['nonfinite_losses']} non-finite losses, {r['scaler_skipped_steps']} scaler-skipped steps"
        return text
    if r["check"] == "latency":
        return (f"raw {r['raw_ms']:.2f} ms, runner {r['runner_ms']:.2f} ms, e2e {r['e2e_ms']:.2f} ms "
                f"({r['detections_at_0_5']} det @0.5), e2e all {r['detections_all_kept']} kept {r['e2e_all_kept_ms']:.2f} ms")
    if r["check"] == "ddp":
        agree = "all-reduce ok, ranks' weights agree" if r["world_size"] > 1 else "all-reduce ok"
        return (f"{r['steps']} steps of {r['size']} at {r['imgsz']}, batch {r['batch']}/rank, "
                f"{r['step_s'] * 1000:.0f} ms/step, {agree}")
    return ""


def _last_line(text: str) -> str:
    """A failure's last line (a spawned rank's error text ends with the exception, after its traceback)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def render(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| check | case | status | result | note |", "|---|---|---|---|---|"]
    for r in rows:
        note = r.get("reason") or _last_line(r.get("error") or "")
        note = " ".join(note.split())[:300].replace("|", "/")
        lines.append(f"| {r['check']} | {r['case']} | {r['status']} | {summary(r)} | {note} |")
    return "\n".join(lines)


def environment(device: Any) -> dict[str, Any]:
    import torch

    from dfineseg.benchmarks.machine import machine_info

    env: dict[str, Any] = {"machine": machine_info(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
    return env


def _nccl_version() -> str | None:
    try:
        import torch

        version = torch.cuda.nccl.version()
        return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # noqa: BLE001  (informational only)
        return None


def parse_args(argv: list[str] | None) -> tuple[Settings, Path]:
    ap = argparse.ArgumentParser(prog="python -m dfineseg.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--sizes", nargs="+", default=None, help="model sizes (default n s; --quick: n)")
    ap.add_argument("--imgsz", type=int, default=None, help="square training/inference input (default 640)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per case (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up training steps per case (default 3)")
    ap.add_argument("--runs", type=int, default=None, help="timed latency runs (default 50; warm-up 10)")
    ap.add_argument("--budget", type=float, default=260.0,
                    help="seconds; measurements that would start later are skipped and listed (default 260)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: imgsz 64, batch 2, 2 steps, size n")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else NORMAL

    def pick(name: str, value: Any) -> Any:
        return base[name] if value is None else value

    imgsz = pick("imgsz", args.imgsz)
    if imgsz % 32 or imgsz <= 0:
        ap.error(f"--imgsz must be a positive multiple of 32, got {imgsz}")
    for name in ("batch", "steps", "runs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    sizes = pick("sizes", args.sizes)
    s = Settings(device=args.device, sizes=sizes, imgsz=imgsz, batch=pick("batch", args.batch),
                 steps=pick("steps", args.steps), warmup=max(0, pick("warmup", args.warmup)),
                 lat_runs=pick("lat_runs", args.runs), lat_warmup=base["lat_warmup"], orig_hw=base["orig_hw"],
                 ddp_size=sizes[0], ddp_imgsz=base["ddp_imgsz"] if args.imgsz is None else imgsz,
                 ddp_batch=base["ddp_batch"], ddp_steps=base["ddp_steps"], budget_s=args.budget, quick=args.quick)
    return s, args.out


def main(argv: list[str] | None = None) -> int:
    s, out = parse_args(argv)
    try:
        check_out_path(out)
    except OutPathError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    if s.device.startswith("cpu"):
        # On a shared CPU, spinning OpenMP workers wait on each other for seconds; passive waiting keeps the
        # smoke run's time sane (set before torch is imported; the spawned gloo ranks inherit it).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from dfineseg.model.dfine import SIZES

    unknown = [z for z in s.sizes if z not in SIZES]
    if unknown:
        print(f"gpu_check: unknown --sizes {unknown}; choose from {sorted(SIZES)}", file=sys.stderr)
        return 2
    try:
        device = torch.device(s.device)
    except RuntimeError:
        print(f"gpu_check: --device {s.device!r} is not a device; use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {s.device} but CUDA is not available here (torch {torch.__version__}, built "
              f"for CUDA {torch.version.cuda or 'none: a CPU-only build'}). Run it on a CUDA machine, or pass "
              "--device cpu for the CPU smoke run (--device cpu --quick).", file=sys.stderr)
        return 2
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        print(f"gpu_check: --device {s.device}, but this machine has {torch.cuda.device_count()} GPU(s)",
              file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_check: --device {s.device}: only cuda and cpu are checked", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    s.device = str(device)
    clock = Clock(s.budget_s)
    env = environment(device)
    rows = run_checks(s, clock)
    wall = time.monotonic() - clock.start
    gpu = env.get("gpu") or "no GPU"
    header = (f"gpu_check on {s.device} ({gpu}; {env['machine']['cpu']}, {env['machine']['cores']} CPUs), "
              f"torch {env['torch']}, CUDA {env['cuda']}, {env['machine']['date']}, {wall:.0f} s"
              f"{', --quick' if s.quick else ''}. NCCL across several GPUs is unverified unless a row says ok.")
    table = render(rows, header)
    print(table, flush=True)
    settings = asdict(s)
    result = {"gpu_check": {"schema": SCHEMA, "command": " ".join([Path(sys.executable).name, "-m",
                                                                    "dfineseg.benchmarks.gpu_check", *(argv or sys.argv[1:])]),
                            "settings": settings, "wall_s": wall, "num_classes": NUM_CLASSES},
              "environment": env, "rows": rows, "table": table}
    from dfineseg.utils.io import atomic_write_bytes

    atomic_write_bytes(out, (json.dumps(result, indent=1, default=str) + "\n").encode("utf-8"))
    log(f"wrote {out}")
    bad = [r["case"] for r in rows if r["status"] == "failed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
