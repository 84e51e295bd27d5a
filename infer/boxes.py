"""Box formats and IoU: the one implementation, for numpy arrays and torch tensors alike.

torch is never imported here: a tensor is recognised by its type's module, and torch is taken from
`sys.modules` (a tensor exists, so torch is loaded), so the deployment runtime stays torch-free while the
training code shares the same maths.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

FORMATS = ("xyxy", "xywh", "cxcywh")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _torch() -> Any:
    return sys.modules["torch"]


def _stack(parts: list[Any], like: Any) -> Any:
    if _is_torch(like):
        return _torch().stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def box_convert(boxes: Any, in_fmt: str, out_fmt: str) -> Any:
    """Convert (..., 4) boxes between `xyxy`, `xywh` (COCO) and `cxcywh` (D-FINE)."""
    if in_fmt not in FORMATS or out_fmt not in FORMATS:
        raise ValueError(f"box formats must be among {FORMATS}, got {in_fmt!r} -> {out_fmt!r}")
    if in_fmt == out_fmt:
        return boxes
    a, b, c, d = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    if in_fmt == "xyxy":
        x1, y1, x2, y2 = a, b, c, d
    elif in_fmt == "xywh":
        x1, y1, x2, y2 = a, b, a + c, b + d
    else:  # cxcywh
        x1, y1, x2, y2 = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    if out_fmt == "xyxy":
        parts = [x1, y1, x2, y2]
    elif out_fmt == "xywh":
        parts = [x1, y1, x2 - x1, y2 - y1]
    else:
        parts = [(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1]
    return _stack(parts, boxes)


def box_area(boxes: Any) -> Any:
    """Area of (..., 4) xyxy boxes (negative extents count as zero)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return w.clip(min=0) * h.clip(min=0)


def box_iou(a: Any, b: Any) -> Any:
    """Pairwise IoU of (N,4) and (M,4) xyxy boxes -> (N,M). Empty unions give 0."""
    area_a = box_area(a)
    area_b = box_area(b)
    lt_x = _maximum(a[:, None, 0], b[None, :, 0])
    lt_y = _maximum(a[:, None, 1], b[None, :, 1])
    rb_x = _minimum(a[:, None, 2], b[None, :, 2])
    rb_y = _minimum(a[:, None, 3], b[None, :, 3])
    inter = (rb_x - lt_x).clip(min=0) * (rb_y - lt_y).clip(min=0)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / _maximum(union, 1e-12 + 0 * union)


def _maximum(x: Any, y: Any) -> Any:
    if _is_torch(x):
        return _torch().maximum(x, y)
    return np.maximum(x, y)


def _minimum(x: Any, y: Any) -> Any:
    if _is_torch(x):
        return _torch().minimum(x, y)
    return np.minimum(x, y)
