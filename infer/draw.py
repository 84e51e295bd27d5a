"""Annotation drawing: translucent masks, boxes, class names and scores on an RGB image (OpenCV).

Masks are blended only inside each detection's crop, so drawing 100 detections on an 8K frame costs
the boxes' area, not 100 full-size masks. Line width and font scale follow the image size so the
labels stay readable on both a 320 px thumbnail and a 4K frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from dfineseg.infer.detections import Detections

# A fixed, colour-blind-friendlier cycle (RGB); class i always gets the same colour across images.
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
        (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
        (0, 0, 128), (128, 128, 128),
    ],
    dtype=np.uint8,
)


def class_color(label: int) -> tuple[int, int, int]:
    c = PALETTE[int(label) % len(PALETTE)]
    return int(c[0]), int(c[1]), int(c[2])


def _color(det: Detections, i: int, track_ids: np.ndarray | None) -> tuple[int, int, int]:
    """A class's colour, or a track's (so two objects of one class stay apart in a video)."""
    return class_color(int(track_ids[i]) if track_ids is not None else int(det.labels[i]))


def _label_text(label: int, score: float, names: Sequence[str], show_conf: bool) -> str:
    name = names[label] if 0 <= label < len(names) else str(label)
    return f"{name} {score:.2f}" if show_conf else name


def draw_detections(
    image: np.ndarray,
    det: Detections,
    names: Sequence[str] = (),
    mask_alpha: float = 0.45,
    line_width: int | None = None,
    show_conf: bool = True,
    track_ids: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of `image` (HxWx3 uint8 RGB) with `det` drawn on it; the input is left unchanged. With
    `track_ids` each detection is coloured by its track and labelled `#id name score`."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    lw = line_width or max(1, round((h + w) / 2 * 0.003))
    font_scale = max(0.35, lw / 3)
    thickness = max(1, lw - 1)
    order = np.argsort(det.scores, kind="stable")  # best detection drawn last, on top

    if det.masks is not None and mask_alpha > 0:
        for i in order:
            crop = det.masks[i]
            x0, y0 = (int(v) for v in det.mask_origins[i])
            ch, cw = crop.shape
            x1, y1 = min(x0 + cw, w), min(y0 + ch, h)
            xa, ya = max(x0, 0), max(y0, 0)
            if x1 <= xa or y1 <= ya:
                continue
            sel = crop[ya - y0 : y1 - y0, xa - x0 : x1 - x0]
            if not sel.any():
                continue
            region = out[ya:y1, xa:x1]
            color = np.array(_color(det, i, track_ids), dtype=np.float32)
            blended = region[sel].astype(np.float32) * (1.0 - mask_alpha) + color * mask_alpha
            region[sel] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)

    for i in order:
        x1, y1, x2, y2 = (int(round(float(v))) for v in det.boxes[i])
        label = int(det.labels[i])
        color = _color(det, i, track_ids)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, lw, lineType=cv2.LINE_AA)
        text = _label_text(label, float(det.scores[i]), names, show_conf)
        if track_ids is not None:
            text = f"#{int(track_ids[i])} {text}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        above = y1 - th - base - 2 >= 0
        ty0 = y1 - th - base - 2 if above else y1
        ty0 = min(ty0, max(h - th - base - 2, 0))
        cv2.rectangle(out, (x1, ty0), (x1 + tw + 2, ty0 + th + base + 2), color, -1)
        text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
        cv2.putText(out, text, (x1 + 1, ty0 + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color, thickness, cv2.LINE_AA)
    return out
