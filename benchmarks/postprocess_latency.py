"""Post-processing latency: `dfineseg.infer.postprocess` vs the naive full-image mask pipeline.

Synthetic exported-graph outputs (no model needed): K queries, of which ``--dets`` pass the threshold,
boxes of 5-35% of the image side (``--box-side``; the default 20 boxes cover ~1.9 Mpx, about the whole
1080p frame, a heavy case), smooth mask logits at 1/4 of the input. Three ways to get the final
masks are timed:
- ``postprocess``: ours (masks only for kept detections, resized only inside each box);
- ``naive kept``: per kept detection, upsample the whole map to the input, undo the resize to the
  original size, threshold, zero outside the box;
- ``naive all``: the same for all K queries before thresholding (what a straightforward port of the
  training-time code does).
Preprocessing of the same image is timed too, for scale. The issue's target: post-processing adds
< 10% to the OpenVINO forward (~50-100 ms for N/S on a 2-core CPU, facts section 10).

    python -m dfineseg.benchmarks.postprocess_latency            # 1920x1080 image, 640 input, 20 of 100
    python -m dfineseg.benchmarks.postprocess_latency --orig 3840x2160 --resize stretch
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np

from dfineseg.infer.detections import integer_boxes
from dfineseg.infer.graph import MASK_EMBED, MASK_FEATURES
from dfineseg.infer.postprocess import postprocess
from dfineseg.infer.preprocess import ResizeMeta, boxes_to_network, preprocess


def synthetic_outputs(
    meta: ResizeMeta, queries: int, dets: int, seed: int = 0, box_side: tuple[float, float] = (0.05, 0.35)
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h0, w0 = meta.orig_shape
    side = rng.uniform(*box_side, (queries, 2)) * [w0, h0]
    xy = rng.uniform(0, 1, (queries, 2)) * ([w0, h0] - side)
    boxes = boxes_to_network(np.concatenate([xy, xy + side], axis=1), meta).astype(np.float32)
    scores = np.concatenate([rng.uniform(0.55, 0.99, dets), rng.uniform(0.0, 0.45, queries - dets)]).astype(np.float32)
    hm, wm = meta.in_h // 4, meta.in_w // 4
    yy, xx = np.mgrid[0:hm, 0:wm]
    cx, cy = (xx + 0.5) / wm, (yy + 0.5) / hm
    logits = np.empty((queries, hm, wm), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        blob = 1 - ((cx - (x1 + x2) / 2) / ((x2 - x1) / 2.5)) ** 2 - ((cy - (y1 + y2) / 2) / ((y2 - y1) / 2.5)) ** 2
        logits[i] = 6 * blob + cv2.resize(rng.normal(size=(8, 8)).astype(np.float32), (wm, hm), interpolation=cv2.INTER_CUBIC)
    # The graph's factored form with one feature channel per query and one-hot embeddings, so that the logit
    # of query i is exactly its blob (real models have 64 channels: the product here is a little dearer).
    return {
        "scores": scores[None],
        "labels": rng.integers(0, 10, (1, queries)).astype(np.int64),
        "boxes": boxes[None],
        MASK_FEATURES: np.ascontiguousarray(logits.transpose(1, 2, 0))[None],
        MASK_EMBED: np.eye(queries, dtype=np.float32)[None],
    }


def naive_masks(outputs: dict[str, np.ndarray], meta: ResizeMeta, conf: float, all_queries: bool) -> np.ndarray:
    scores = outputs["scores"][0]
    idx = np.arange(len(scores)) if all_queries else np.nonzero(scores >= conf)[0]
    idx = idx[np.argsort(-scores[idx], kind="stable")]  # postprocess's order
    nh, nw = meta.content_hw
    boxes = outputs["boxes"][0][idx] * [meta.in_w, meta.in_h, meta.in_w, meta.in_h]
    boxes = (boxes - [meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y]) / [meta.scale_x, meta.scale_y, meta.scale_x, meta.scale_y]
    rects = integer_boxes(boxes, meta.orig_shape)
    out = np.zeros((len(idx), meta.orig_h, meta.orig_w), bool)
    # the product for the detections it processes, over the whole map (what an in-graph product computes)
    logits = (outputs[MASK_FEATURES][0] @ outputs[MASK_EMBED][0, idx].T).transpose(2, 0, 1)
    for k, (logit, (x0, y0, x1, y1)) in enumerate(zip(logits, rects)):
        up = cv2.resize(logit, (meta.in_w, meta.in_h), interpolation=cv2.INTER_LINEAR)
        full = cv2.resize(up[meta.pad_y : meta.pad_y + nh, meta.pad_x : meta.pad_x + nw], (meta.orig_w, meta.orig_h),
                          interpolation=cv2.INTER_LINEAR)
        out[k, y0:y1, x0:x1] = full[y0:y1, x0:x1] > 0
    if all_queries:
        out = out[scores[idx] >= conf]
    return out


def timed_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median wall, min wall, median process CPU) milliseconds. On a shared CPU the wall-clock median
    mostly measures the neighbours; the min and the CPU time (all of this process's threads) bound
    what an idle machine would show."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orig", default="1920x1080", help="original image WxH")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--resize", default="letterbox", choices=["letterbox", "stretch"])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--dets", type=int, default=20)
    ap.add_argument("--conf", type=float, default=0.5)
    ap.add_argument("--box-side", type=float, nargs=2, default=(0.05, 0.35), metavar=("MIN", "MAX"),
                    help="box sides as fractions of the image side (uniform)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="cv2.setNumThreads (default: OpenCV's choice)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        cv2.setNumThreads(args.threads)
    w0, h0 = (int(v) for v in args.orig.lower().split("x"))
    image = np.random.default_rng(1).integers(0, 255, (h0, w0, 3), dtype=np.uint8)
    _, metas = preprocess([image], args.imgsz, args.resize)
    outputs = synthetic_outputs(metas[0], args.queries, args.dets, box_side=tuple(args.box_side))

    (det,) = postprocess(outputs, metas, conf=args.conf)
    assert len(det) == args.dets
    ref = naive_masks(outputs, metas[0], args.conf, all_queries=False)
    full = det.full_masks()
    ious = [(full[i] & ref[i]).sum() / max((full[i] | ref[i]).sum(), 1) for i in range(len(det))]

    timings = {
        "preprocess": timed_ms(lambda: preprocess([image], args.imgsz, args.resize), args.repeats),
        "postprocess": timed_ms(lambda: postprocess(outputs, metas, conf=args.conf), args.repeats),
        "postprocess + full_masks()": timed_ms(lambda: postprocess(outputs, metas, conf=args.conf)[0].full_masks(), args.repeats),
        "naive, kept masks": timed_ms(lambda: naive_masks(outputs, metas[0], args.conf, False), max(3, args.repeats // 4)),
        "naive, all K masks": timed_ms(lambda: naive_masks(outputs, metas[0], args.conf, True), 3, warmup=1),
    }
    mask_px = sum(m.size for m in det.masks)
    print(f"{w0}x{h0} image, {args.imgsz} {args.resize} input, {args.dets} of {args.queries} queries kept "
          f"(boxes cover {mask_px / 1e6:.2f} Mpx), cv2 threads {cv2.getNumThreads()}")
    print(f"  {'step':<28} {'median ms':>10} {'min ms':>10} {'cpu ms':>10}")
    for key, (med, low, cpu) in timings.items():
        print(f"  {key:<28} {med:10.2f} {low:10.2f} {cpu:10.2f}")
    print(f"  min mask IoU, ours vs naive: {min(ious):.4f}")
    return {"timings_ms": timings, "min_mask_iou": float(min(ious)), "mask_mpx": mask_px / 1e6}


if __name__ == "__main__":
    main()
