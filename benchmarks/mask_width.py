"""Mask-head width by accuracy: train the same recipe at each width and seed, report mean and sd of mask F1.

    python -m dfineseg.benchmarks.mask_width --config configs/demo.yaml data=datasets/demo/data.yaml \\
        --widths 64,128,256 --seeds 0,1,2 --jobs 2 --threads 1 --out runs/mask_width

Every run is a plain `dfineseg train` (fixed epochs, no time budget, so a busy machine changes the wall
time but not the result) with `model.mask_head.mask_channels` and `fpn_channels` set to the width and
`train.seed` to the seed; extra `key=value` arguments go to every run. The score of a run is its best
validation `val/best_f1` (mask F1 at the best threshold for the segment task) from results.csv.

The choice rule (issue 5): the narrowest width whose mean F1 is within one standard deviation of the
widest width's mean (the widest's sd; the paper's head is 256 wide).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_score(run_dir: Path) -> dict[str, float]:
    """Best `val/best_f1` over the validated epochs of one run, with that epoch's mask mAP."""
    rows = list(csv.DictReader((run_dir / "results.csv").open(encoding="utf-8")))
    scored = [r for r in rows if r.get("val/best_f1")]
    if not scored:
        raise RuntimeError(f"{run_dir / 'results.csv'} has no validated epoch")
    best = max(scored, key=lambda r: float(r["val/best_f1"]))
    return {
        "best_f1": float(best["val/best_f1"]),
        "best_conf": float(best.get("val/best_conf") or "nan"),
        "mask_map50_95": float(best.get("val/mask_map50_95") or "nan"),
        "box_f1": float(best.get("val/box_f1") or "nan"),
        "epoch": int(best["epoch"]),
        "steps": int(rows[-1]["step"]),
        "time_s": float(rows[-1]["time_s"]),
    }


def choose_width(summary: dict[int, dict[str, float]]) -> int:
    """The narrowest width whose mean is within one sd of the widest width's mean."""
    widest = max(summary)
    ref_mean, ref_sd = summary[widest]["mean"], summary[widest]["sd"]
    for width in sorted(summary):
        if summary[width]["mean"] >= ref_mean - ref_sd:
            return width
    return widest


def summarise(scores: dict[tuple[int, int], dict[str, float]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for width in sorted({w for w, _ in scores}):
        f1s = [s["best_f1"] for (w, _), s in sorted(scores.items()) if w == width]
        maps = [s["mask_map50_95"] for (w, _), s in sorted(scores.items()) if w == width]
        out[width] = {
            "n": len(f1s), "mean": statistics.fmean(f1s), "sd": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
            "min": min(f1s), "max": max(f1s), "map_mean": statistics.fmean(maps),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfineseg.benchmarks.mask_width",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--widths", default="64,128,256")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training")
    parser.add_argument("--out", default="runs/mask_width")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (data=..., epochs=...)")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)

    def one(width: int, seed: int) -> tuple[tuple[int, int], dict[str, float]]:
        name = f"w{width}_s{seed}"
        run_dir = out / name
        if not (run_dir / "results.csv").exists() or not (run_dir / "best.pt").exists():
            cmd = [sys.executable, "-m", "dfineseg", "train", "--config", args.config, *args.overrides,
                   f"project={out}", f"name={name}", "exist_ok=true", "time=null",
                   f"model.mask_head.mask_channels={width}", f"model.mask_head.fpn_channels={width}",
                   f"train.seed={seed}"]
            with (out / f"{name}.log").open("w", encoding="utf-8") as log:
                res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"run {name} failed (exit {res.returncode}); see {out / (name + '.log')}")
        return (width, seed), run_score(run_dir)

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        scores = dict(pool.map(lambda ws: one(*ws), [(w, s) for s in seeds for w in widths]))
    summary = summarise(scores)
    chosen = choose_width(summary)
    lines = [f"mask-head width study: {args.config} {' '.join(args.overrides)}; seeds {seeds}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {time.time() - t0:.0f} s", "",
             "| width | runs | mask F1 mean | sd | min | max | mask mAP50-95 mean |", "|---|---|---|---|---|---|---|"]
    for width, s in summary.items():
        lines.append(f"| {width} | {s['n']} | {s['mean']:.3f} | {s['sd']:.3f} | {s['min']:.3f} | {s['max']:.3f} "
                     f"| {s['map_mean']:.3f} |")
    lines += ["", "| run | best F1 | conf | box F1 | mask mAP50-95 | at epoch | steps |", "|---|---|---|---|---|---|---|"]
    for (width, seed), s in sorted(scores.items()):
        lines.append(f"| w{width} seed {seed} | {s['best_f1']:.3f} | {s['best_conf']:.2f} | {s['box_f1']:.3f} "
                     f"| {s['mask_map50_95']:.3f} | {s['epoch']} | {s['steps']} |")
    lines += ["", f"chosen (narrowest within one sd of {max(summary)}): **{chosen}**"]
    table = "\n".join(lines)
    print(table)
    (out / "mask_width.md").write_text(table + "\n", encoding="utf-8")
    (out / "mask_width.json").write_text(json.dumps({"scores": {f"{w}_{s}": v for (w, s), v in scores.items()},
                                                     "summary": summary, "chosen": chosen}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
