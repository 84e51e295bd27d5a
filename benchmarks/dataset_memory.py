"""RAM of a parsed dataset index: 10k images x 100 polygon instances (target: under 2 GB).

Label text is generated in memory (16-point polygons, 1 in 10 a plain box) and parsed by the real YOLO
line parser into the real `DatasetIndex` types, so the number is what training holds for such a dataset.
Image headers are not read (that costs time, not index memory).

    python -m dfineseg.benchmarks.dataset_memory [--images 10000] [--instances 100] [--points 16] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np

from dfineseg.data.index import DatasetIndex, ImageRecord
from dfineseg.data.yolo import parse_label_text


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _label_text(rng: np.random.Generator, instances: int, points: int) -> str:
    lines = []
    for k in range(instances):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        r = rng.uniform(0.02, 0.15)
        if k % 10 == 9:
            lines.append(f"{k % 80} {cx:.6f} {cy:.6f} {r:.6f} {r:.6f}")
            continue
        t = np.linspace(0, 2 * np.pi, points, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).clip(0, 1).reshape(-1)
        lines.append(f"{k % 80} " + " ".join(f"{v:.6f}" for v in pts))
    return "\n".join(lines)


def build_index(images: int, instances: int, points: int, seed: int = 0) -> DatasetIndex:
    rng = np.random.default_rng(seed)
    # A handful of distinct label files, parsed again for every image (parsing allocates fresh arrays),
    # keeps generation time out of the measurement without sharing any parsed object.
    texts = [_label_text(rng, instances, points) for _ in range(16)]
    records = []
    for i in range(images):
        inst, _ = parse_label_text(texts[i % len(texts)], 640, 480, 80, f"labels/{i:06d}.txt")
        records.append(ImageRecord(i + 1, Path(f"/data/images/train/{i:06d}.jpg"), 640, 480, inst))
    return DatasetIndex([f"c{i}" for i in range(80)], list(range(80)), records, [], "yolo", "train", "bench")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--tracemalloc", action="store_true", help="also count Python allocations exactly (slower)")
    args = ap.parse_args(argv)
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    index = build_index(args.images, args.instances, args.points)
    seconds = time.perf_counter() - t0
    gc.collect()
    rss = _rss_bytes() - rss0
    n = sum(len(r.instances) for r in index.images)
    print(f"index: {len(index.images)} images, {n} instances ({args.points}-point polygons, 10% boxes), built in {seconds:.1f} s")
    print(f"RSS growth: {rss / 2**20:.0f} MiB ({rss / n:.0f} bytes per instance)")
    if args.tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc: current {current / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
