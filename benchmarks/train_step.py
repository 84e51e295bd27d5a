"""Training step time and peak memory per model size (forward + fp32 loss + backward + AdamW step).

    python -m dfineseg.benchmarks.train_step --sizes n,s --imgsz 640 --batch 4 --steps 3
    python -m dfineseg.benchmarks.train_step --sizes s --imgsz 640 --batch 8 --device cuda --amp
    python -m dfineseg.benchmarks.train_step --sizes n --imgsz 320 --batch 8 --classes 5 --breakdown
    python -m dfineseg.benchmarks.train_step --sizes s --imgsz 320 --model backbone=dinov2_s   # model.* keys

Each size runs in its own subprocess so its peak resident memory (CPU) is its own; on CUDA the peak is
torch.cuda.max_memory_allocated. Inputs are random images with 4 generated objects per image (boxes
and masks), so the numbers cover the model, the matcher and every loss term, not data loading.
Prints a markdown table (and writes it with --out). `--breakdown` adds the median seconds of each phase
of the step: forward, loss (and the Hungarian matcher inside it, all its calls), backward, gradient
clipping + AdamW, EMA update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _targets(batch: int, h: int, w: int, num_classes: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        n = 4
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        boxes = torch.cat([cxcy, wh], 1)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for i, (cx, cy, bw, bh) in enumerate(boxes.tolist()):
            masks[i, int((cy - bh / 2) * h): int((cy + bh / 2) * h), int((cx - bw / 2) * w): int((cx + bw / 2) * w)] = True
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": boxes, "masks": masks,
                    "has_mask": torch.ones(n, dtype=torch.bool)})
    return out


def measure(size: str, imgsz: int, batch: int, steps: int, warmup: int, device: str, amp: bool, threads: int | None,
            num_classes: int = 80, model_keys: list[str] | None = None) -> dict:
    """One size in this process: seconds per step (median), each phase's median, and peak memory in GiB."""
    import resource

    import torch

    from dfineseg.config import Config
    from dfineseg.loss.criterion import build_criterion, total_loss
    from dfineseg.model.dfine import build_model
    from dfineseg.train.ema import ModelEMA
    from dfineseg.train.optim import build_optimizer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    from dfineseg.overrides import parse_value

    cfg = Config()
    cfg.model.size = size
    for item in model_keys or []:  # model.* settings (validated by the schema on assignment)
        key, _, value = item.partition("=")
        setattr(cfg.model, key, parse_value(value))
    dev = torch.device(device)
    model = build_model(cfg.model, num_classes).to(dev).train()
    criterion = build_criterion(cfg.loss, num_classes, cfg.model.task)
    optimizer = build_optimizer(model, cfg.train, size)
    ema = ModelEMA(model)

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    # The matcher runs inside the criterion once per supervised output: time its calls where they happen.
    matcher_s = [0.0]
    match = criterion.matcher.forward

    def timed_match(*args, **kwargs):
        t = sync()
        result = match(*args, **kwargs)
        matcher_s[0] += sync() - t
        return result

    criterion.matcher.forward = timed_match
    images = torch.rand(batch, 3, imgsz, imgsz, device=dev)
    targets = [{k: v.to(dev) for k, v in t.items()} for t in _targets(batch, imgsz, imgsz, num_classes)]
    use_amp = amp and dev.type == "cuda"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    phases: dict[str, list[float]] = {k: [] for k in ("forward", "loss", "matcher", "backward", "optimizer", "ema")}
    for i in range(warmup + steps):
        matcher_s[0] = 0.0
        t0 = sync()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(images, targets)
        t1 = sync()
        loss = total_loss(criterion(outputs, targets))
        t2 = sync()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = sync()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        t4 = sync()
        ema.update(model)
        t5 = sync()
        if i >= warmup:
            times.append(t5 - t0)
            for key, value in zip(phases, (t1 - t0, t2 - t1, matcher_s[0], t3 - t2, t4 - t3, t5 - t4)):
                phases[key].append(value)
    times.sort()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "size": size, "imgsz": imgsz, "batch": batch, "device": device, "amp": use_amp,
        "threads": torch.get_num_threads(), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s_median": times[len(times) // 2], "step_s_min": times[0], "images_per_s": batch / times[len(times) // 2],
        "peak_mem_gib": peak, "steps": steps, "classes": num_classes,
        "phases_s": {k: sorted(v)[len(v) // 2] for k, v in phases.items()}, "model": list(model_keys or []),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfineseg.benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="n,s")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--classes", type=int, default=80, help="classes of the head (80: COCO)")
    parser.add_argument("--breakdown", action="store_true", help="also print the median seconds of each phase")
    parser.add_argument("--out", default=None, help="write the table (markdown) and a .json next to it")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="a model.* setting, e.g. backbone=dinov2_s or memory_fusion=dense (repeatable)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = parser.parse_args(argv)
    if args.one:
        row = measure(args.one, args.imgsz, args.batch, args.steps, args.warmup, args.device, args.amp, args.threads,
                      args.classes, args.model)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        cmd = [sys.executable, "-m", "dfineseg.benchmarks.train_step", "--one", size, "--imgsz", str(args.imgsz),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--classes", str(args.classes)] + (["--amp"] if args.amp else []) + (
               ["--threads", str(args.threads)] if args.threads else []) + [f"--model={m}" for m in args.model]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            print(f"size {size} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[len("RESULT "):]))
    header = "| size | params M | input | batch | device | threads | step s (median) | images/s | peak mem GiB |"
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d')}" + (f"; model: {', '.join(args.model)}" if args.model else ""), "", header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params_m']:.2f} | {r['imgsz']} | {r['batch']} | {r['device']}{' bf16' if r['amp'] else ''} "
                     f"| {r['threads']} | {r['step_s_median']:.2f} | {r['images_per_s']:.2f} | {r['peak_mem_gib']:.2f} |")
    if args.breakdown:
        lines += ["", "| size | " + " | ".join(f"{k} s" for k in rows[0]["phases_s"]) + " |",
                  "|" + "---|" * (1 + len(rows[0]["phases_s"]))]
        lines += [f"| {r['size']} | " + " | ".join(f"{v:.3f}" for v in r["phases_s"].values()) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
