"""The generated demo dataset: textured shapes with occlusion, in YOLO (and optionally COCO) format.

Made to be learnable in minutes on a CPU: 5 classes with distinct outlines, mostly medium/large objects
(12-45 % of the short side), 1-6 per image, colour correlated with class (80 %) but not decisive, and
occlusion capped so every labelled object keeps at least half of its area visible. Masks are the
visible part. Deterministic: each image draws from its own generator seeded by (seed, split, index), and
files are written without timestamps, so one seed gives byte-identical files (with the same OpenCV).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "rectangle", "triangle", "star", "cross")
# OpenCV hue (0..180) each class prefers.
_CLASS_HUES = (0, 110, 60, 25, 150)
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_MIN_VISIBLE = 0.5
_JPEG_QUALITY = 92


def _shape_points(cls: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Outline of a class-`cls` shape of diameter ~`size`, centred at 0, as float [K,2]."""
    r = size / 2
    angle = rng.uniform(0, 2 * np.pi)
    if cls == 0:  # circle / mild ellipse
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r * rng.uniform(0.8, 1.0)], axis=1)
    elif cls == 1:  # rectangle
        a = r * 0.95
        b = a * rng.uniform(0.45, 0.9)
        pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif cls == 2:  # triangle
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.15, 0.15, 3)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * r * 1.05
    elif cls == 3:  # five-pointed star
        t = np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.4, 0.5))
        pts = np.stack([np.cos(t) * radius, np.sin(t) * radius], axis=1)
    else:  # cross (plus sign)
        a, b = r, r * rng.uniform(0.28, 0.38)
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T


def _fill(mask: np.ndarray, pts: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)


def _colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    hue = (_CLASS_HUES[cls] + rng.integers(-8, 9)) % 180 if rng.random() < 0.8 else rng.integers(0, 180)
    hsv = np.array([[[hue, rng.integers(150, 256), rng.integers(130, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(h: int, w: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An h x w x 3 float patch: flat, gradient, stripes or speckle in shades of `colour`."""
    kind = rng.integers(0, 4)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3))
    elif kind == 1:
        t = np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy
        shade = 0.6 + 0.4 * (t - t.min()) / max(float(np.ptp(t)), 1.0)
    elif kind == 2:
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 14)
        t = np.cos(theta) * xx + np.sin(theta) * yy
        shade = np.where((t // (period / 2)) % 2 == 0, np.float32(1.0), np.float32(0.7))
    else:
        shade = 0.85 + 0.15 * rng.random((h, w), dtype=np.float32)
    return shade[..., None] * colour


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(50, 205)
    c1 = (grey + 0.5 * (rng.uniform(40, 215, 3) - grey)).astype(np.float32)  # muted, so shapes stand out
    c2 = np.clip(c1 + rng.uniform(-60, 60, 3), 0, 255).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.float32(np.cos(theta)) * np.arange(w, dtype=np.float32)[None, :] + np.float32(
        np.sin(theta)
    ) * np.arange(h, dtype=np.float32)[:, None]
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = c1 + (c2 - c1) * t[..., None]
    # Grey-ish clutter (lines and small blobs) so that "anything with an edge" is not a shape.
    for _ in range(rng.integers(3, 9)):
        grey = float(rng.uniform(30, 225))
        col = tuple(float(np.clip(grey + rng.uniform(-25, 25), 0, 255)) for _ in range(3))
        if rng.random() < 0.6:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, col, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(img, centre, int(rng.integers(3, max(4, min(h, w) // 30))), col, -1, cv2.LINE_AA)
    return img


def _local_mask(pts: np.ndarray, h: int, w: int) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """The shape rasterised only inside its (image-clipped) bounding box: (bool mask, (x0, y0, x1, y1))."""
    x0, y0 = max(int(np.floor(pts[:, 0].min())), 0), max(int(np.floor(pts[:, 1].min())), 0)
    x1, y1 = min(int(np.ceil(pts[:, 0].max())) + 1, w), min(int(np.ceil(pts[:, 1].max())) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _fill(local, pts - (x0, y0))
    return local.astype(bool), (x0, y0, x1, y1)


def place_objects(
    img: np.ndarray,
    rng: np.random.Generator,
    count: int,
    n_classes: int,
    propose: Callable[[int, np.random.Generator], tuple[np.ndarray, tuple[int, int, int, int]] | None],
    colour: Callable[[int, np.random.Generator], np.ndarray],
    min_visible: float,
    tries: int,
) -> tuple[list[int], list[np.ndarray]]:
    """Paint up to `count` objects onto `img` (float HxWx3, in place): each of a random class, placed by
    `propose(cls, rng) -> (bool mask, box) | None` (None: try again), kept only where every earlier object
    keeps `min_visible` of its own area. Returns each kept object's class and visible mask (bool HxW)."""
    h, w = img.shape[:2]
    classes: list[int] = []
    visible: list[np.ndarray] = []  # full-size, updated as later objects cover them
    areas: list[int] = []
    for _ in range(count):
        cls = int(rng.integers(0, n_classes))
        for _try in range(tries):
            drawn = propose(cls, rng)
            if drawn is None:
                continue
            m, (x0, y0, x1, y1) = drawn
            if all(v.sum() - (v[y0:y1, x0:x1] & m).sum() >= min_visible * a for v, a in zip(visible, areas)):
                break
        else:
            continue
        for v in visible:
            v[y0:y1, x0:x1] &= ~m
        patch = _texture(y1 - y0, x1 - x0, colour(cls, rng), rng)
        img[y0:y1, x0:x1][m] = patch[m]
        full = np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = m
        classes.append(cls)
        visible.append(full)
        areas.append(int(m.sum()))
    return classes, visible


def synth_image(rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """One RGB uint8 image, the class of each object and its visible mask (bool HxW)."""
    w, h = (int(v) for v in rng.integers(320, 481, size=2))
    short = min(h, w)
    img = _background(h, w, rng)

    def propose(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
        size = rng.uniform(0.12, 0.45) * short
        margin = size * 0.4
        centre = np.array([rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)])
        drawn = _local_mask(_shape_points(cls, size, rng) + centre, h, w)
        return None if drawn is None or drawn[0].sum() < 64 else drawn

    # Every earlier object keeps at least half of its own area visible.
    classes, visible = place_objects(img, rng, int(rng.integers(1, 7)), len(CLASSES), propose, _colour,
                                     _MIN_VISIBLE, tries=12)
    # 2x2-pixel grain: a quarter of the random draws of per-pixel noise, which dominated the run time
    grain = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32) * np.float32(4.0)
    img += cv2.resize(grain, ((w + 1) // 2 * 2, (h + 1) // 2 * 2), interpolation=cv2.INTER_NEAREST)[:h, :w]
    out = cv2.convertScaleAbs(img)  # saturating float -> uint8 (values are >= 0 up to the noise)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    return out, classes, visible


def _largest_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The visible part's largest outer contour, simplified, in continuous pixel coordinates."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    c = cv2.approxPolyDP(c, 0.8, True).reshape(-1, 2)
    return c.astype(np.float64) + 0.5 if len(c) >= 3 else None


def _coco_segmentation(mask: np.ndarray) -> list | dict:
    """Polygons when the visible part is one simple region, compressed RLE when it has holes or pieces."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 1 and len(contours[0]) >= 3:
        pts = contours[0].reshape(-1, 2).astype(np.float64) + 0.5
        return [[round(float(v), 2) for v in pts.reshape(-1)]]
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def write_synthetic_dataset(
    out: str | Path, n_train: int = 200, n_val: int = 50, coco: bool = False, seed: int = 0, hard: bool = False
) -> Path:
    """Write images/{train,val}, labels/{train,val} and data.yaml (+ annotations/instances_*.json when
    `coco`) under `out`; returns the data.yaml path. `hard`: the harder set of `dfineseg.data.synthetic_hard`."""
    out = Path(out)
    if hard:
        from dfineseg.data import synthetic_hard

        classes_of_set, label_polygon = synthetic_hard.CLASSES, synthetic_hard.mask_polygon

        def make(rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[np.ndarray], int]:
            return synthetic_hard.synth_hard_image(rng)
    else:
        classes_of_set, label_polygon = CLASSES, _largest_polygon

        def make(rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[np.ndarray], int]:
            return (*synth_image(rng), _JPEG_QUALITY)

    for split, n in (("train", n_train), ("val", n_val)):
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        coco_images, coco_anns = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
            img, classes, visible, quality = make(rng)
            h, w = img.shape[:2]
            name = f"{i + 1:06d}"
            ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise RuntimeError(f"OpenCV could not encode {name}.jpg")
            (img_dir / f"{name}.jpg").write_bytes(buf.tobytes())
            lines = []
            for cls, m in zip(classes, visible):
                poly = label_polygon(m)
                if poly is None:
                    continue
                norm = (poly / [w, h]).clip(0, 1).reshape(-1)
                lines.append(f"{cls} " + " ".join(f"{v:.6f}" for v in norm))
                if coco:
                    ys, xs = np.nonzero(m)
                    x0, y0 = int(xs.min()), int(ys.min())
                    coco_anns.append(
                        {
                            "id": len(coco_anns) + 1,
                            "image_id": i + 1,
                            "category_id": cls + 1,
                            "segmentation": _coco_segmentation(m),
                            "area": int(m.sum()),
                            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                            "iscrowd": 0,
                        }
                    )
            (lbl_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            coco_images.append({"id": i + 1, "file_name": f"{name}.jpg", "width": w, "height": h})
        if coco:
            ann_dir = out / "annotations"
            ann_dir.mkdir(parents=True, exist_ok=True)
            doc = {
                "info": {"description": f"dfineseg synthetic shapes{' (hard)' if hard else ''}, seed {seed}"},
                "images": coco_images,
                "annotations": coco_anns,
                "categories": [
                    {"id": c + 1, "name": name, "supercategory": "shape"} for c, name in enumerate(classes_of_set)
                ],
            }
            (ann_dir / f"instances_{split}.json").write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    data_yaml = out / "data.yaml"
    names = "".join(f"  {c}: {name}\n" for c, name in enumerate(classes_of_set))
    # No `path:` key: the folder of data.yaml is the root, here and in Ultralytics.
    kind = "hard synthetic shapes" if hard else "synthetic shapes"
    data_yaml.write_text(
        f"# dfineseg {kind} (seed {seed})\ntrain: images/train\nval: images/val\nnames:\n{names}",
        encoding="utf-8",
    )
    return data_yaml
