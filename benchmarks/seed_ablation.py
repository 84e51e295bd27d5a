"""The seed techniques' ablation: each switch alone (and combinations) against the default, several training
seeds, fixed steps, on the `--hard` data; mean and sd of mask / box F1 at conf 0.5 and mask mAP, step time.

    python -m dfineseg.benchmarks.seed_ablation --data /tmp/hard_seed1/data.yaml --seeds 0 1 \\
        --variant default= --variant fusion=model.memory_fusion=dense \\
        --variant mixup=data.augment.mixup.p=0.5 --out runs/seed_ablation

Each run is `dfineseg train data=... model.size=n imgsz=256 epochs=E batch=4` plus the base keys and the
variant's keys, in its own process, one after the other (never two timing jobs at once); E is chosen so the
run has at least `--steps` optimizer steps. The base (`--base recipe`, the default) is the short-budget
recipe's keys (dfineseg/train/short_budget.py) given explicitly, because a fixed-step run has no `time=` to
trigger it and the schema's defaults learn nothing in 600 steps from scratch (issue 16 measured F1 0.0);
`--base schema` trains with the schema's defaults instead. The table (markdown) and every run's headline metrics (JSON) go to `--out`.
Deploy latency ratios are measured separately (`dfineseg.benchmarks.model_latency`), in one session.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, keys = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant NAME=key=value,key=value (got {text!r})")
    return name, [k for k in keys.split(",") if k]


def _train_images(data: Path) -> int:
    import yaml

    cfg = yaml.safe_load(data.read_text())
    root = Path(cfg.get("path") or data.parent)
    train = root / cfg["train"]
    return sum(1 for p in train.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def base_keys(base: str) -> list[str]:
    """The keys every variant shares: the short-budget recipe's (less the batch, which --batch sets) or none."""
    if base == "schema":
        return []
    from dfineseg.train.short_budget import RECIPE

    return [f"{c.key}={c.value}" for c in RECIPE if c.key != "train.batch"]


def _metrics(run: Path) -> dict:
    """The final validation's headline numbers (best.pt, conf 0.5) of one run folder."""
    metrics = json.loads((run / "val" / "metrics.json").read_text())
    return {"mask_f1": metrics["mask"]["f1"], "box_f1": metrics["box"]["f1"],
            "mask_map50_95": metrics["mask"]["map50_95"], "best_f1": metrics["sweep"]["best_f1"]}


def run_one(args: argparse.Namespace, name: str, keys: list[str], seed: int, epochs: int) -> dict:
    run_name = f"{name}-seed{seed}"
    saved = args.out / run_name / "ablation_row.json"
    if args.reuse and saved.is_file():  # a finished run of an earlier call (e.g. before adding a third seed)
        row = json.loads(saved.read_text())
        return {**row, **_metrics(args.out / run_name)}
    cmd = [sys.executable, "-m", "dfineseg.cli", "train", f"data={args.data}", f"model.size={args.size}",
           f"imgsz={args.imgsz}", f"epochs={epochs}", f"batch={args.batch}", f"train.seed={seed}",
           f"project={args.out}", f"name={run_name}", "exist_ok=true", f"train.val_every={epochs}",
           *base_keys(args.base), *keys]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{run_name} failed:\n{proc.stderr[-3000:]}")
    steps = epochs * math.ceil(args.train_images / args.batch)
    row = {"variant": name, "seed": seed, "keys": keys, "seconds": seconds, "steps": steps,
           "s_per_step": seconds / steps, **_metrics(args.out / run_name)}
    saved.write_text(json.dumps(row, indent=2))
    return row


def table(rows: list[dict]) -> str:
    out = ["| variant | seeds | mask F1 @0.5 (mean ± sd) | box F1 @0.5 | mask mAP50-95 | best-threshold mask F1 | "
           "s/step |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]

        def ms(key: str, rs=rs) -> str:
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        best = ms("best_f1") if all("best_f1" in r for r in rs) else "-"
        out.append(f"| {name} | {len(rs)} | {ms('mask_f1')} | {ms('box_f1')} | {ms('mask_map50_95')} | {best} | "
                   f"{statistics.mean(r['s_per_step'] for r in rs):.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--variant", type=_variant, action="append", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--size", default="n")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--base", choices=("recipe", "schema"), default="recipe",
                    help="keys all variants share: the short-budget recipe (default) or the schema's defaults")
    ap.add_argument("--out", type=Path, default=Path("runs/seed_ablation"))
    ap.add_argument("--reuse", action="store_true", help="take finished runs' rows from --out instead of retraining")
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing: the table of the finished runs in --out (a variant may have fewer seeds)")
    args = ap.parse_args()
    args.train_images = _train_images(args.data)
    epochs = math.ceil(args.steps / math.ceil(args.train_images / args.batch))
    rows = []
    for seed in args.seeds:
        for name, keys in args.variant:
            if args.table_only:
                if not (args.out / f"{name}-seed{seed}" / "ablation_row.json").is_file():
                    continue
                args.reuse = True
            row = run_one(args, name, keys, seed, epochs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=2))
    (args.out / "ablation.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
