"""Tiled inference for small objects on large images (`infer tile=640 overlap=0.2`).

A model sees its input at `imgsz`; an object of 20 px in a 4000 px photo shrinks to 3 px and is lost.
Tiling runs the model on overlapping square windows of `tile` original pixels (each resized to the model's
input, so small objects keep their size) plus the whole image once (large objects that no window holds),
maps every detection back to full-image pixels, and merges the duplicates that overlapping windows and the
whole-image pass produce.

Merging is greedy by score and class-aware: a detection is dropped when it overlaps an already kept one of
its class by more than `merge` of the smaller of the two (intersection over the smaller area, masks for
segment models, boxes otherwise): a window border cuts an object into a part whose area lies almost
entirely inside the whole object's detection, which plain IoU would keep as a second object.

Memory stays bounded on an 8K image: windows are views of the image, batches are the predictor's, and
masks stay crops placed by their origins (never full-size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dfineseg.infer.boxes import box_area
from dfineseg.infer.detections import Detections
from dfineseg.infer.metrics import compact_mask_intersections
from dfineseg.infer.postprocess import greedy_suppression


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) windows of side `tile` (clipped to the image) covering it, neighbours overlapping by
    `overlap` of a tile; the last row and column end at the image border."""
    if tile < 32:
        raise ValueError(f"tile={tile}: give the tile side in pixels of the original image (at least 32)")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap}: a fraction of the tile in [0, 1)")
    stride = max(1, int(round(tile * (1.0 - overlap))))

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        out = list(range(0, size - tile, stride))
        out.append(size - tile)
        return sorted(set(out))

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


def shift_detections(det: Detections, dx: int, dy: int, image_shape: tuple[int, int]) -> Detections:
    """Detections of a window at (dx, dy) in the coordinates of the full image."""
    boxes = det.boxes + np.array([dx, dy, dx, dy], dtype=np.float32)
    origins = None if det.mask_origins is None else det.mask_origins + np.array([dx, dy], dtype=np.int64)
    return Detections(boxes, det.scores, det.labels, image_shape, det.masks, origins)


def concat_detections(parts: Sequence[Detections], image_shape: tuple[int, int], with_masks: bool) -> Detections:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Detections.empty(image_shape, with_masks=with_masks)
    return Detections(
        np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
        np.concatenate([p.labels for p in parts]), image_shape,
        [m for p in parts for m in p.masks] if with_masks else None,
        np.concatenate([p.mask_origins for p in parts]) if with_masks else None,
    )


def merge_duplicates(det: Detections, merge: float = 0.5) -> Detections:
    """Greedy, class-aware: keep the best-scoring detection, drop others of its class whose overlap with it
    exceeds `merge` of the smaller one's area (masks when present, else boxes). Highest score first."""
    if len(det) == 0:
        return det
    order = np.argsort(-det.scores, kind="stable")
    det = det[order]
    if det.has_masks:
        inter = compact_mask_intersections(det.masks, det.mask_origins, det.masks, det.mask_origins).astype(np.float64)
        area = np.diag(inter).copy()
    else:
        b = det.boxes.astype(np.float64)
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
        area = box_area(b)
    smaller = np.minimum(area[:, None], area[None, :])
    overlap = np.where(smaller > 0, inter / np.maximum(smaller, 1e-12), 0.0)
    return det[greedy_suppression(overlap, det.labels, merge)]


def predict_tiled(predictor, image: np.ndarray, tile: int, overlap: float = 0.2, conf: float | None = None,
                  merge: float = 0.5, whole_image: bool = True) -> Detections:
    """Detections of `image` (HxWx3) from overlapping `tile` windows (+ the whole image), merged."""
    h, w = image.shape[:2]
    windows = tile_windows(h, w, tile, overlap)
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
    found = predictor.predict_batch(crops, conf=conf)
    parts = [shift_detections(d, x0, y0, (h, w)) for d, (x0, y0, _, _) in zip(found, windows, strict=True)]
    if whole_image and len(windows) > 1:
        parts.append(predictor.predict_batch([image], conf=conf)[0])
    with_masks = predictor.task == "segment"
    return merge_duplicates(concat_detections(parts, (h, w), with_masks), merge)
