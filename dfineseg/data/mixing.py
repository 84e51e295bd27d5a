"""Augmentations that combine the training image with another one (seed 003 section 5), masks kept exact.

The other image (`load_random`, as for mosaic) is first resized to this image's size. Then:
- **MixUp**: the two images blended with a weight drawn from Beta(8, 8); every instance of both kept as is
  (a blend hides nothing).
- **CutMix**: a rectangle of the other image pasted in; this image's instances lose the pixels under it
  (dropped when less than `MIN_VISIBLE_FRACTION` of them stays visible), the other's instances are those
  visible inside the rectangle, clipped to it.
- **Copy-paste** (Ghiasi et al. 2021, the simple form): a random subset of the other image's segmented
  instances pasted with their pixels at their place; they occlude this image's instances, whose masks
  lose the pasted pixels (and are dropped when too little stays visible).

An occluded instance's geometry becomes a mask crop (its exact remaining pixels); a box-only instance keeps
its box while enough of the box stays visible. Instance order: this image's survivors, then the other's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import cv2
import numpy as np

from dfineseg.data.transforms import (
    MIN_VISIBLE_FRACTION,
    Augment,
    Geometry,
    Sample,
    crop_of,
    draw_geometry,
    fit_within,
    warp_sample,
)


def resized_to(sample: Sample, hw: tuple[int, int]) -> Sample:
    """`sample` stretched to exactly `hw` (image and instances)."""
    h0, w0 = sample.image.shape[:2]
    h, w = hw
    if (h0, w0) == (h, w):
        return sample
    image = cv2.resize(sample.image, (w, h), interpolation=cv2.INTER_AREA if h * w < h0 * w0 else cv2.INTER_LINEAR)
    return warp_sample(sample, image, np.array([[w / w0, 0, 0], [0, h / h0, 0]], float), min_size=0.0)


def occlude(sample: Sample, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Geometry]]:
    """This sample's instances with the pixels of the bool image-size `hidden` removed; those keeping less
    than MIN_VISIBLE_FRACTION of their area are dropped. Returns (labels, boxes, geoms)."""
    h, w = hidden.shape
    labels, boxes, geoms = [], [], []
    full = np.zeros((h, w), np.uint8)
    for label, box, geom in zip(sample.labels, sample.boxes, sample.geoms, strict=True):
        if geom is None:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            region = hidden[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
            if region.size and 1.0 - region.mean() < MIN_VISIBLE_FRACTION:
                continue
            labels.append(label)
            boxes.append(box)
            geoms.append(None)
            continue
        full[:] = 0
        draw_geometry(geom, full)
        before = int(full.sum())
        full[hidden] = 0
        after = int(full.sum())
        if after == 0 or after < MIN_VISIBLE_FRACTION * before:
            continue
        crop = crop_of(full)
        labels.append(label)
        boxes.append(crop.box())
        geoms.append(crop)
    return (np.array(labels, dtype=np.int64), np.array(boxes, dtype=np.float32).reshape(-1, 4), geoms)


def _combined(sample: Sample, image: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, list[Geometry]]]) -> Sample:
    return replace(
        sample, image=np.ascontiguousarray(image), masks=None,
        labels=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
        boxes=np.concatenate([p[1] for p in parts]).reshape(-1, 4) if parts else np.zeros((0, 4), np.float32),
        geoms=[g for p in parts for g in p[2]],
    )


class _Mixing(Augment):
    def __init__(self, p=0.0, off_epoch=None, load_random: Callable[[np.random.Generator], Sample] | None = None):
        super().__init__(p, off_epoch)
        self.load_random = load_random

    def other(self, sample: Sample, rng: np.random.Generator, hw: tuple[int, int]) -> Sample:
        h, w = sample.image.shape[:2]
        return resized_to(fit_within(self.load_random(rng), (h, w)), (h, w))

    def __call__(self, sample: Sample, rng: np.random.Generator, hw: tuple[int, int]) -> Sample:
        if self.load_random is None or not self.fires(rng):
            return sample
        return self.mix(sample, self.other(sample, rng, hw), rng)

    def mix(self, sample: Sample, other: Sample, rng: np.random.Generator) -> Sample:  # pragma: no cover
        raise NotImplementedError


class MixUp(_Mixing):
    def mix(self, sample: Sample, other: Sample, rng: np.random.Generator) -> Sample:
        lam = float(rng.beta(8.0, 8.0))
        image = np.clip(sample.image.astype(np.float32) * lam + other.image.astype(np.float32) * (1 - lam) + 0.5,
                        0, 255).astype(np.uint8)
        return _combined(sample, image, [(sample.labels, sample.boxes, list(sample.geoms)),
                                         (other.labels, other.boxes, list(other.geoms))])


class CutMix(_Mixing):
    def region(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): a rectangle of 30-70 % of the image area, anywhere inside it."""
        frac = float(np.sqrt(rng.uniform(0.3, 0.7)))
        rw, rh = max(1, int(round(w * frac))), max(1, int(round(h * frac)))
        x0, y0 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
        return x0, y0, x0 + rw, y0 + rh

    def mix(self, sample: Sample, other: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample.image.shape[:2]
        x0, y0, x1, y1 = self.region(h, w, rng)
        hidden = np.zeros((h, w), bool)
        hidden[y0:y1, x0:x1] = True
        image = sample.image.copy()
        image[y0:y1, x0:x1] = other.image[y0:y1, x0:x1]
        # The other image's instances keep exactly their pixels inside the rectangle (removing the outside as
        # an occlusion, so a rasterised polygon cannot spill a pixel past the pasted region).
        labels, boxes, geoms = occlude(other, ~hidden)
        for i, geom in enumerate(geoms):  # a box-only instance is cut to the rectangle
            if geom is None:
                boxes[i] = np.clip(boxes[i], [x0, y0, x0, y0], [x1, y1, x1, y1])
        return _combined(sample, image, [occlude(sample, hidden), (labels, boxes, geoms)])


class CopyPaste(_Mixing):
    def chosen(self, other: Sample, rng: np.random.Generator) -> np.ndarray:
        """Indices of the other image's segmented instances to paste: each with probability 1/2, at least one."""
        masked = np.array([i for i, g in enumerate(other.geoms) if g is not None], dtype=np.int64)
        if len(masked) == 0:
            return masked
        pick = masked[rng.random(len(masked)) < 0.5]
        return pick if len(pick) else masked[[int(rng.integers(len(masked)))]]

    def mix(self, sample: Sample, other: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample.image.shape[:2]
        idx = self.chosen(other, rng)
        if len(idx) == 0:
            return sample
        pasted = np.zeros((h, w), np.uint8)
        for i in idx:
            draw_geometry(other.geoms[i], pasted)
        hidden = pasted.astype(bool)
        image = sample.image.copy()
        image[hidden] = other.image[hidden]
        chosen = (other.labels[idx], other.boxes[idx], [other.geoms[i] for i in idx])
        return _combined(sample, image, [occlude(sample, hidden), chosen])
