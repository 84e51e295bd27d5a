"""The harder generated dataset (`dfineseg data synth OUT --hard`): closer to real data than the demo set.

What makes it harder than the demo set (`dfineseg.data.synthetic`), each on purpose:
- real-resolution images, 480-960 x 360-720 px, so 128 px training no longer sees the objects;
- 3-9 objects per image, sizes log-uniform from ~15 px to a third of the short side (many small ones);
- shapes whose masks are not convex blobs: rings with holes and thin bars, besides triangles, stars and
  crosses; colour follows the class only half of the time;
- heavy occlusion: an object is placed only if every earlier object keeps at least 30 % of its area
  visible (the demo keeps 50 %), so visible parts come in pieces and with holes;
- mild blur on a third of the images, JPEG quality drawn from 85-95.

Labels are the visible parts. A YOLO polygon cannot hold a hole or a second piece, so each visible part
is written as ONE polygon whose holes and pieces are joined to it by zero-width cuts (the usual way to
store them in that format); filling that polygon gives back the mask (tests check the IoU). COCO
annotations use RLE for such parts. Deterministic like the demo set: same seed, same bytes.
"""

from __future__ import annotations

import cv2
import numpy as np

from dfineseg.data.synthetic import _background, _local_mask, place_objects

CLASSES = ("ring", "bar", "triangle", "star", "cross")
_CLASS_HUES = (0, 110, 60, 25, 150)
MIN_VISIBLE = 0.3
IMAGE_W = (480, 960)
IMAGE_H = (360, 720)
OBJECTS = (3, 9)
MIN_OBJECT = 15.0  # px, the smallest object diameter
JPEG_QUALITY = (85, 95)
DEFAULT_COUNTS = (300, 60)  # train, val images
_TRACE_SCALE = 4


def _circle(r: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * r


def shape_outlines(cls: int, size: float, rng: np.random.Generator) -> list[np.ndarray]:
    """A class-`cls` shape of diameter ~`size` centred at 0: [outer] or [outer, hole] as float [K,2]."""
    r = size / 2
    angle = rng.uniform(0, 2 * np.pi)
    if cls == 0:  # ring: a hole of 35-60 % of the radius
        squash = rng.uniform(0.75, 1.0)
        outer = _circle(r) * (1.0, squash)
        parts = [outer, _circle(r * rng.uniform(0.35, 0.6)) * (1.0, squash)]
    elif cls == 1:  # thin bar: 6-14 times as long as wide
        a = r
        b = max(a / rng.uniform(6, 14), 1.5)  # half-width: a bar is at least 3 px wide
        parts = [np.array([[-a, -b], [a, -b], [a, b], [-a, b]])]
    elif cls == 2:  # triangle
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.2, 0.2, 3)
        parts = [np.stack([np.cos(t), np.sin(t)], axis=1) * r * 1.05]
    elif cls == 3:  # five-pointed star
        t = np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        parts = [np.stack([np.cos(t) * radius, np.sin(t) * radius], axis=1)]
    else:  # cross
        a, b = r, r * rng.uniform(0.22, 0.36)
        parts = [np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                           [-a, b], [-a, -b], [-b, -b]])]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [p @ rot.T for p in parts]


def _draw(parts: list[np.ndarray], centre: np.ndarray, h: int, w: int):
    """The shape (holes cut out) rasterised inside its image-clipped box: (bool mask, (x0, y0, x1, y1))."""
    drawn = _local_mask(parts[0] + centre, h, w)
    if drawn is None:
        return None
    m, (x0, y0, x1, y1) = drawn
    for hole in parts[1:]:
        cut = np.zeros(m.shape, np.uint8)
        cv2.fillPoly(cut, [np.round((hole + centre - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
        m &= ~cut.astype(bool)
    return m, (x0, y0, x1, y1)


def _colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    hue = (_CLASS_HUES[cls] + rng.integers(-10, 11)) % 180 if rng.random() < 0.5 else rng.integers(0, 180)
    hsv = np.array([[[hue, rng.integers(90, 256), rng.integers(90, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def synth_hard_image(rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[np.ndarray], int]:
    """One RGB uint8 image, each object's class and visible mask (bool HxW), and its JPEG quality."""
    w, h = int(rng.integers(IMAGE_W[0], IMAGE_W[1] + 1)), int(rng.integers(IMAGE_H[0], IMAGE_H[1] + 1))
    largest = min(h, w) / 3
    img = _background(h, w, rng)

    def propose(cls: int, rng: np.random.Generator):
        size = float(np.exp(rng.uniform(np.log(MIN_OBJECT), np.log(largest))))
        margin = size * 0.3
        centre = np.array([rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)])
        drawn = _draw(shape_outlines(cls, size, rng), centre, h, w)
        return None if drawn is None or drawn[0].sum() < 24 else drawn

    classes, visible = place_objects(img, rng, int(rng.integers(OBJECTS[0], OBJECTS[1] + 1)), len(CLASSES), propose,
                                     _colour, MIN_VISIBLE, tries=16)
    grain = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32) * np.float32(5.0)
    img += cv2.resize(grain, ((w + 1) // 2 * 2, (h + 1) // 2 * 2), interpolation=cv2.INTER_NEAREST)[:h, :w]
    out = cv2.convertScaleAbs(img)
    if rng.random() < 1 / 3:
        out = cv2.GaussianBlur(out, (3, 3), rng.uniform(0.6, 1.2))
    return out, classes, visible, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices (i, j) of the closest pair a[i], b[j]."""
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return int(i), int(j)


def _splice(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`base` with `other` walked in at their closest points and back (a zero-width cut joins them)."""
    i, j = _nearest(base, other)
    loop = np.concatenate([other[j:], other[: j + 1]])
    return np.concatenate([base[: i + 1], loop, base[i : i + 1], base[i + 1 :]])


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """One polygon (float [K,2], continuous pixel coordinates) whose filling is `mask`: the largest outer
    contour with every hole and every other piece spliced in by zero-width cuts. None for an empty mask.

    Traced at 4x (nearest-neighbour upsampling), so the outline runs within 1/8 px of the pixel edges: the
    evaluation's rasteriser (pycocotools) then gives back the mask exactly, and the training one (OpenCV,
    boundary pixels included) within a pixel's rim; tracing pixel centres at 1x would shrink the
    evaluation's masks by half a pixel all round, a large loss for a 15 px object (measured in the tests).
    """
    big = cv2.resize(mask.astype(np.uint8), None, fx=_TRACE_SCALE, fy=_TRACE_SCALE, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    rings = []
    for contour in contours:
        pts = cv2.approxPolyDP(contour, 1.0, True).reshape(-1, 2)  # within 1/4 px at the image's scale
        if len(pts) >= 3:
            rings.append((pts.astype(np.float64) + 0.5) / _TRACE_SCALE)
    if not rings:
        return None
    order = sorted(range(len(rings)), key=lambda k: -abs(cv2.contourArea(rings[k].astype(np.float32))))
    polygon = rings[order[0]]
    for k in order[1:]:
        polygon = _splice(polygon, rings[k])
    return polygon
