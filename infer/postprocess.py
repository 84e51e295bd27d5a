"""Exported-graph outputs -> one `Detections` per image (numpy + OpenCV, no torch).

Used by training-time validation and by every backend, so their numbers agree.

Masks are the expensive part: upsampling K=100 mask maps to the full image and undoing the resize
costs image area x queries. Here only detections that pass the threshold get a mask, and each mask is
computed only inside its own box: the logit cells under the box (plus the neighbours that bilinear
interpolation at the box border reads, exactly as a full-image resize would) are sampled bilinearly
straight at the original pixels' positions (separable: a small horizontal pass, then a banded
vertical product), then binarised at logit 0 (= sigmoid 0.5). The cost therefore grows with the kept
boxes' area only, and no image-size array is ever allocated.

Coordinate chain for a mask (continuous coordinates, pixel i covers [i, i+1)): original x ->
network ``x * scale_x + pad_x`` -> mask grid ``network * Wm / W``; the bilinear sample position of
original pixel i is that of its centre, minus 0.5 (OpenCV's / align_corners=False convention). This is
exactly the position a full-image ``resize(mask, (W,H))`` followed by un-letterboxing and
``resize(..., (W0,H0))`` would sample; the two differ only in interpolating once instead of twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dfineseg.infer.boxes import box_iou
from dfineseg.infer.detections import Detections, integer_boxes
from dfineseg.infer.graph import (
    DETECTION_OUTPUTS,
    KNOWN_OUTPUTS,
    MASK_EMBED,
    MASK_FEATURES,
    MASK_LOGITS,
    OUTPUT_NAMES,
)
from dfineseg.infer.preprocess import ResizeMeta, boxes_to_original


def _as_output_dict(outputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(outputs, Mapping):
        missing = [k for k in DETECTION_OUTPUTS if k not in outputs]
        if missing:
            raise KeyError(f"model outputs lack {missing}; got {sorted(outputs)} (expected {list(OUTPUT_NAMES)})")
        return {k: np.asarray(v) for k, v in outputs.items() if k in KNOWN_OUTPUTS and v is not None}
    seq = list(outputs)
    if len(seq) not in (3, 5):
        raise ValueError(f"expected 3 (detect) or 5 (segment) model outputs in the order {OUTPUT_NAMES}, got {len(seq)}")
    return {k: np.asarray(v) for k, v in zip(OUTPUT_NAMES, seq)}


def score_threshold(labels: np.ndarray, conf: float, class_conf: Mapping[int, float] | None) -> np.ndarray:
    """Per-detection threshold: ``class_conf[label]`` where given, else ``conf``. float32 like the
    scores, so a score equal to the threshold is kept (postprocess and the metrics share this)."""
    thr = np.full(labels.shape, float(conf), dtype=np.float32)
    if class_conf:
        for cls, value in class_conf.items():
            thr[labels == int(cls)] = float(value)
    return thr


def nms_class_aware(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thr: float) -> np.ndarray:
    """Greedy non-maximum suppression within each class. Returns kept indices, highest score first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float64)
    return order[greedy_suppression(box_iou(b, b), labels[order], iou_thr)]


def greedy_suppression(overlap: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy suppression over items sorted by descending score: each kept item removes the
    later ones of its class whose `overlap` with it exceeds `threshold` (NMS; tile merging)."""
    same = labels[:, None] == labels[None, :]
    suppressed = np.zeros(len(labels), dtype=bool)
    keep = []
    for i in range(len(labels)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= same[i] & (overlap[i] > threshold)
    return np.array(keep, dtype=np.int64)


# OpenBLAS runs a product on all its threads above ~2.6e5 multiply-adds; on a busy CPU (or next to
# OpenVINO's own threads) those threads spin and a 0.3 ms product takes 40 ms. Products here are kept
# below that size, so they run on the calling thread.
_MAX_MACS_PER_PRODUCT = 131_072

# Class-aware NMS after the score threshold, on by default: D-FINE-seg emits some duplicates, and removing
# them raised mask F1 at conf 0.5 on both measured sets (demo 0.704 -> 0.733, hard 0.595 -> 0.618; recall
# unchanged; docs/BENCHMARKS.md, "NMS at post-processing"). None turns it off (`nms_iou=none`).
DEFAULT_NMS_IOU = 0.7


def _sample_positions(n_out: int, a: float, b: float, n_map: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D bilinear sampling of output i at map position ``a*i + b``, clamped to the map like OpenCV's
    resize at the border: (index of the left/top cell, float32 weight of the next cell)."""
    pos = np.clip(a * np.arange(n_out, dtype=np.float64) + b, 0.0, n_map - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), max(n_map - 2, 0))
    return i0, (pos - i0).astype(np.float32)


class FeatureLogits:
    """One detection's (Hm, Wm) mask-logit map, computed only where it is read: ``logits[y0:y1, x0:x1]`` is
    the product of that window of the pixel features (Hm, Wm, C) with the detection's embedding (C,)."""

    def __init__(self, features: np.ndarray, embed: np.ndarray) -> None:
        self.features = features
        self.embed = np.asarray(embed, dtype=np.float32)
        self.shape = features.shape[:2]

    def __getitem__(self, window: tuple[slice, slice]) -> np.ndarray:
        crop = self.features[window]  # (h, w, C), a view
        h, w, c = crop.shape
        out = np.empty((h, w), dtype=np.float32)
        rows = max(1, _MAX_MACS_PER_PRODUCT // max(w * c, 1))  # rows per product: see _MAX_MACS_PER_PRODUCT
        for r0 in range(0, h, rows):
            np.matmul(crop[r0 : r0 + rows], self.embed, out=out[r0 : r0 + rows])
        return out


def mask_logit_maps(outputs: Mapping[str, np.ndarray], b: int) -> Callable[[int], Any] | None:
    """Image b's mask logits as `k -> (Hm, Wm) map` (an array, or a `FeatureLogits` computed on demand);
    None for a detection model. Reads today's factored outputs and the ``mask_logits`` of schema-1 files."""
    if MASK_LOGITS in outputs:
        logits = outputs[MASK_LOGITS][b]
        return lambda k: logits[k]
    if MASK_FEATURES in outputs:
        features, embed = outputs[MASK_FEATURES][b], outputs[MASK_EMBED][b]
        return lambda k: FeatureLogits(features, embed[k])
    return None


def mask_logit_rows(outputs: Mapping[str, np.ndarray], b: int, rows: np.ndarray) -> np.ndarray:
    """Full (len(rows), Hm, Wm) float64 logit maps of detections `rows` of image b (for parity checks)."""
    if MASK_LOGITS in outputs:
        return outputs[MASK_LOGITS][b, rows].astype(np.float64)
    features = outputs[MASK_FEATURES][b].astype(np.float64)
    return np.einsum("kc,hwc->khw", outputs[MASK_EMBED][b, rows].astype(np.float64), features, optimize=True)


def _check_mask_shapes(out: Mapping[str, np.ndarray], scores: np.ndarray) -> None:
    if MASK_LOGITS in out:
        logits = out[MASK_LOGITS]
        if logits.ndim != 4 or logits.shape[:2] != scores.shape:
            raise ValueError(f"mask_logits shape {logits.shape} does not match scores {scores.shape} (expected [B,K,H/4,W/4])")
        return
    if (MASK_FEATURES in out) != (MASK_EMBED in out):
        raise ValueError(f"segment outputs need both {MASK_FEATURES} and {MASK_EMBED}; got {sorted(out)}")
    if MASK_FEATURES in out:
        features, embed = out[MASK_FEATURES], out[MASK_EMBED]
        if features.ndim != 4 or embed.shape != scores.shape + (features.shape[-1],) or features.shape[0] != scores.shape[0]:
            raise ValueError(
                f"mask output shapes {MASK_FEATURES} {features.shape}, {MASK_EMBED} {embed.shape} do not match scores "
                f"{scores.shape} (expected [B,H/4,W/4,C] and [B,K,C])"
            )


def mask_in_box(logits: Any, meta: ResizeMeta, rect: Sequence[int]) -> np.ndarray:
    """Binary mask of one detection over its pixel rectangle (x0, y0, x1, y1) in the original image.

    ``logits`` is the detection's (Hm, Wm) mask-logit map at 1/4 of the network input: an array, or a
    `FeatureLogits` that computes the window it is asked for. Only the cells under the box and the
    neighbours bilinear interpolation at its edge reads are touched. Bilinear
    interpolation is separable: the horizontal pass runs on the few crop rows (small), the vertical
    pass is a banded product computed a band of rows at a time.
    """
    x0, y0, x1, y1 = (int(v) for v in rect)
    out_h, out_w = y1 - y0, x1 - x0
    if out_h <= 0 or out_w <= 0:
        return np.zeros((max(out_h, 0), max(out_w, 0)), dtype=bool)
    hm, wm = logits.shape
    # Original pixel index -> mask-grid sample position (see the module docstring).
    ax = meta.scale_x * wm / meta.in_w
    ay = meta.scale_y * hm / meta.in_h
    bx = (meta.pad_x + 0.5 * meta.scale_x) * wm / meta.in_w - 0.5
    by = (meta.pad_y + 0.5 * meta.scale_y) * hm / meta.in_h - 0.5
    ix, fx = _sample_positions(out_w, ax, ax * x0 + bx, wm)
    iy, fy = _sample_positions(out_h, ay, ay * y0 + by, hm)
    cx0, cx1 = int(ix[0]), min(int(ix[-1]) + 2, wm)
    cy0, cy1 = int(iy[0]), min(int(iy[-1]) + 2, hm)
    crop = logits[cy0:cy1, cx0:cx1].astype(np.float32, copy=False)
    ch, cw = crop.shape
    lx = ix - cx0
    rows = crop[:, lx] * (1.0 - fx) + crop[:, np.minimum(lx + 1, cw - 1)] * fx  # (ch, out_w)

    ly = iy - cy0
    hy = np.minimum(ly + 1, ch - 1)
    wy = np.zeros((out_h, ch), dtype=np.float32)
    r = np.arange(out_h)
    wy[r, ly] = 1.0 - fy
    wy[r, hy] += fy
    out = np.empty((out_h, out_w), dtype=bool)
    band = 32
    while band > 1 and band * (band * ay + 2) * out_w > _MAX_MACS_PER_PRODUCT:
        band //= 2
    for r0 in range(0, out_h, band):
        r1 = min(r0 + band, out_h)
        k0, k1 = int(ly[r0]), int(hy[r1 - 1]) + 1
        np.greater(wy[r0:r1, k0:k1] @ rows[k0:k1], 0.0, out=out[r0:r1])
    return out


def postprocess(
    outputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    metas: Sequence[ResizeMeta],
    conf: float = 0.5,
    class_conf: Mapping[int, float] | None = None,
    nms_iou: float | None = None,
    max_det: int | None = None,
) -> list[Detections]:
    """Batched graph outputs (``scores`` [B,K], ``labels`` [B,K], ``boxes`` [B,K,4] xyxy normalised, for
    segment ``mask_features`` [B,H/4,W/4,C] + ``mask_embed`` [B,K,C], or a schema-1 file's ``mask_logits``
    [B,K,H/4,W/4]) -> one `Detections` per image.

    Keeps ``score >= threshold`` (``class_conf`` maps a class index to its own threshold, others use
    ``conf``), then optional class-aware NMS at ``nms_iou`` (off by default: DETR outputs need none),
    then the ``max_det`` best; boxes go back to original pixels (clipped) and masks are made only for
    the kept detections, inside their boxes.
    """
    out = _as_output_dict(outputs)
    scores, labels, boxes = out["scores"], out["labels"], out["boxes"]
    if scores.ndim != 2 or labels.shape != scores.shape or boxes.shape != scores.shape + (4,):
        raise ValueError(
            f"output shapes disagree: scores {scores.shape}, labels {labels.shape}, boxes {boxes.shape} "
            "(expected [B,K], [B,K], [B,K,4])"
        )
    _check_mask_shapes(out, scores)
    if len(metas) != scores.shape[0]:
        raise ValueError(f"{len(metas)} resize metas for a batch of {scores.shape[0]}")

    results = []
    for b, meta in enumerate(metas):
        s = scores[b].astype(np.float32)
        lab = labels[b].astype(np.int64)
        keep = np.nonzero(s >= score_threshold(lab, conf, class_conf))[0]
        keep = keep[np.argsort(-s[keep], kind="stable")]
        if nms_iou is not None and len(keep):
            keep = keep[nms_class_aware(boxes[b][keep], s[keep], lab[keep], nms_iou)]
        if max_det is not None:
            keep = keep[:max_det]
        xyxy = boxes_to_original(boxes[b][keep], meta, clip=True).astype(np.float32)
        masks = origins = None
        logit_map = mask_logit_maps(out, b)
        if logit_map is not None:
            rects = integer_boxes(xyxy, meta.orig_shape)
            masks = [mask_in_box(logit_map(k), meta, r) for k, r in zip(keep, rects)]
            origins = rects[:, :2]
        results.append(
            Detections(
                boxes=xyxy, scores=s[keep], labels=lab[keep], image_shape=meta.orig_shape, masks=masks, mask_origins=origins
            )
        )
    return results
