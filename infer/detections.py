"""`Detections`: the one per-image result type of every backend and of training validation.

Masks are stored compactly: one bool crop per detection plus the crop's top-left corner in the
original image. A full-size mask is built only when asked (``full_masks()``), because 100 masks of an
8K image would take 3 GB. For predictions the crop covers the detection's integer box
(``floor(x1), floor(y1)`` .. ``ceil(x2), ceil(y2)`` clipped to the image), so a pixel the box only
partly covers counts as inside it; the type itself accepts any crop placement (ground truth uses the
mask's own extent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def integer_boxes(boxes: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Pixel rectangles (x0, y0, x1, y1), exclusive end, covering float xyxy boxes, clipped to the image."""
    h0, w0 = image_shape
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty((len(b), 4), dtype=np.int64)
    out[:, 0] = np.floor(b[:, 0]).clip(0, w0)
    out[:, 1] = np.floor(b[:, 1]).clip(0, h0)
    out[:, 2] = np.ceil(b[:, 2]).clip(0, w0)
    out[:, 3] = np.ceil(b[:, 3]).clip(0, h0)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 1])
    return out


def crop_rle(crop: np.ndarray, origin: tuple[int, int], image_shape: tuple[int, int]) -> dict:
    """COCO compressed RLE of a full-size mask that is zero except ``crop`` placed at ``origin`` (x, y).

    Built from the crop's runs directly, so the full-size mask is never materialised.
    """
    from pycocotools import mask as mask_util

    h0, w0 = int(image_shape[0]), int(image_shape[1])
    x0, y0 = int(origin[0]), int(origin[1])
    ch, cw = crop.shape
    total = h0 * w0
    if ch == 0 or cw == 0 or not crop.any():
        counts = [total]
    else:
        # Column-major (COCO's order): pad each column with a zero above and below so runs never cross
        # columns; the transitions then alternate start, end, start, ... Full index of crop (row, col)
        # is (x0 + col) * h0 + y0 + row.
        padded = np.zeros((cw, ch + 2), dtype=np.int8)
        padded[:, 1:-1] = crop.T
        flips = np.flatnonzero(np.diff(padded, axis=1))
        col, row = np.divmod(flips, ch + 1)
        edges = (x0 + col) * h0 + y0 + row
        starts, ends = edges[0::2], edges[1::2]
        # A run that ends at the bottom of one column and restarts at the top of the next is one run
        # in the flattened image (only possible when the crop spans the full height).
        joined = starts[1:] == ends[:-1]
        if joined.any():
            starts = np.concatenate([starts[:1], starts[1:][~joined]])
            ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
        bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
        bounds[0] = 0
        bounds[1:-1:2] = starts
        bounds[2:-1:2] = ends
        bounds[-1] = total
        counts = np.diff(bounds).tolist()
        if counts[-1] == 0:  # a mask reaching the last pixel ends on a ones-run, like pycocotools' own
            counts.pop()
    return mask_util.frPyObjects({"size": [h0, w0], "counts": counts}, h0, w0)


def crop_polygon_mask_lines(crop: np.ndarray) -> np.ndarray | None:
    """Largest outer contour of a bool crop as (K,2) float pixel coordinates, or None when empty."""
    import cv2

    if crop.size == 0 or not crop.any():
        return None
    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    best = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    return best.reshape(-1, 2).astype(np.float64)


@dataclass(eq=False)  # array fields: no element-wise ==, compare fields explicitly
class Detections:
    """Detections of one image.

    boxes: float32 (N,4) xyxy in original-image pixels; scores: float32 (N,); labels: int64 (N,)
    contiguous 0..C-1; masks: None (detection model) or a list of N bool crops; mask_origins: int64
    (N,2) (x, y) of each crop's top-left pixel; image_shape: (H0, W0).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image_shape: tuple[int, int]
    masks: list[np.ndarray] | None = None
    mask_origins: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.image_shape = (int(self.image_shape[0]), int(self.image_shape[1]))
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(f"boxes ({n}), scores ({len(self.scores)}) and labels ({len(self.labels)}) must have equal length")
        if self.masks is not None:
            self.masks = list(self.masks)
            if len(self.masks) != n:
                raise ValueError(f"{len(self.masks)} masks for {n} detections")
            if self.mask_origins is None:
                self.mask_origins = integer_boxes(self.boxes, self.image_shape)[:, :2]
            self.mask_origins = np.asarray(self.mask_origins, dtype=np.int64).reshape(-1, 2)
            if len(self.mask_origins) != n:
                raise ValueError(f"{len(self.mask_origins)} mask origins for {n} detections")
            for i, m in enumerate(self.masks):
                if m.dtype != np.bool_ or m.ndim != 2:
                    raise ValueError(f"mask {i} must be a 2-D bool crop, got {m.dtype} {m.shape}")
        elif self.mask_origins is not None:
            raise ValueError("mask_origins given without masks")

    # ------------------------------------------------------------------ construction and selection
    @classmethod
    def empty(cls, image_shape: tuple[int, int], with_masks: bool = False) -> Detections:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros(0, np.float32),
            labels=np.zeros(0, np.int64),
            image_shape=image_shape,
            masks=[] if with_masks else None,
            mask_origins=np.zeros((0, 2), np.int64) if with_masks else None,
        )

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: np.ndarray | Sequence[int] | slice | int) -> Detections:
        """Select detections by a boolean array, integer indices, a slice or one integer."""
        if isinstance(index, int | np.integer):
            index = [int(index)]
        if isinstance(index, slice):
            idx = np.arange(len(self))[index]
        else:
            arr = np.asarray(index)
            if arr.dtype == np.bool_:
                if arr.shape != (len(self),):
                    raise IndexError(f"boolean index of shape {arr.shape} for {len(self)} detections")
                idx = np.nonzero(arr)[0]
            else:
                idx = arr.astype(np.int64).reshape(-1)
        return Detections(
            boxes=self.boxes[idx],
            scores=self.scores[idx],
            labels=self.labels[idx],
            image_shape=self.image_shape,
            masks=None if self.masks is None else [self.masks[i] for i in idx],
            mask_origins=None if self.mask_origins is None else self.mask_origins[idx],
        )

    def filter(self, keep: np.ndarray) -> Detections:
        return self[np.asarray(keep, dtype=bool)]

    # ------------------------------------------------------------------ masks
    def _require_masks(self) -> None:
        if self.masks is None:
            raise ValueError("these detections have no masks (a detection model); use boxes instead")

    def full_masks(self) -> np.ndarray:
        """bool (N,H0,W0): each crop pasted into an otherwise empty image-size mask."""
        self._require_masks()
        h0, w0 = self.image_shape
        out = np.zeros((len(self), h0, w0), dtype=bool)
        for i, (m, (x0, y0)) in enumerate(zip(self.masks, self.mask_origins)):
            ch, cw = m.shape
            # Crops are clipped to the image when created; clip again so foreign crops can't overflow.
            x1, y1 = min(x0 + cw, w0), min(y0 + ch, h0)
            xa, ya = max(x0, 0), max(y0, 0)
            if x1 > xa and y1 > ya:
                out[i, ya:y1, xa:x1] = m[ya - y0 : y1 - y0, xa - x0 : x1 - x0]
        return out

    def rle(self) -> list[dict]:
        """COCO compressed RLEs (``counts`` as bytes, pycocotools' own form) at the original size."""
        self._require_masks()
        out = []
        for m, (x0, y0) in zip(self.masks, self.mask_origins):
            m, (x0, y0) = _clip_crop(m, int(x0), int(y0), self.image_shape)
            out.append(crop_rle(m, (x0, y0), self.image_shape))
        return out

    # ------------------------------------------------------------------ export formats
    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None, with_masks: bool = True) -> list[dict]:
        """COCO results entries: image_id, category_id (the dataset's ids), bbox xywh, score, segmentation."""
        if category_ids is not None and len(self) and int(self.labels.max()) >= len(category_ids):
            raise ValueError(f"label {int(self.labels.max())} has no category id ({len(category_ids)} given)")
        rles = self.rle() if (with_masks and self.masks is not None) else None
        out = []
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            label = int(self.labels[i])
            entry = {
                "image_id": int(image_id),
                "category_id": int(category_ids[label]) if category_ids is not None else label,
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "score": round(float(self.scores[i]), 6),
            }
            if rles is not None:
                entry["segmentation"] = {"size": list(rles[i]["size"]), "counts": rles[i]["counts"].decode("ascii")}
            out.append(entry)
        return out

    def to_yolo_lines(self, names: Sequence[str] | None = None, with_conf: bool = False) -> list[str]:
        """YOLO txt lines, coordinates normalised to the image size.

        Segment: ``cls x1 y1 x2 y2 ...`` along the mask's largest outer contour (an empty mask
        falls back to its box's four corners, so the line count always equals the detection count).
        Detect: ``cls cx cy w h``. YOLO files hold class indices; ``names`` (the model's classes) only
        checks that every label has one. ``with_conf`` appends the score, like Ultralytics' save_conf.
        """
        if names is not None and len(self) and int(self.labels.max()) >= len(names):
            raise ValueError(f"label {int(self.labels.max())} has no name ({len(names)} classes)")
        h0, w0 = self.image_shape
        lines = []
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            parts = [str(int(self.labels[i]))]
            if self.masks is None:
                vals = [(x1 + x2) / 2 / w0, (y1 + y2) / 2 / h0, (x2 - x1) / w0, (y2 - y1) / h0]
            else:
                poly = crop_polygon_mask_lines(self.masks[i])
                if poly is None:
                    poly = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
                else:
                    poly = poly + self.mask_origins[i][None, :]
                poly = poly / np.array([w0, h0], dtype=np.float64)
                vals = poly.clip(0, 1).reshape(-1).tolist()
            parts += [f"{v:.6g}" for v in vals]
            if with_conf:
                parts.append(f"{float(self.scores[i]):.6g}")
            lines.append(" ".join(parts))
        return lines

    def __repr__(self) -> str:
        kind = "segment" if self.masks is not None else "detect"
        return f"Detections(n={len(self)}, image_shape={self.image_shape}, {kind})"


def _clip_crop(crop: np.ndarray, x0: int, y0: int, image_shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    h0, w0 = image_shape
    ch, cw = crop.shape
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + cw, w0), min(y0 + ch, h0)
    if (xa, ya, xb, yb) == (x0, y0, x0 + cw, y0 + ch):
        return crop, (x0, y0)
    if xb <= xa or yb <= ya:
        return np.zeros((0, 0), dtype=bool), (0, 0)
    return crop[ya - y0 : yb - y0, xa - x0 : xb - x0], (xa, ya)
