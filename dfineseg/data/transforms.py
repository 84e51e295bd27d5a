"""Augmentation and the final resize, on numpy/OpenCV only (torch-free; dataset.py makes the tensors).

Every geometric step is a 2x3 affine map in continuous pixel coordinates (pixel i covers [i, i+1)),
applied to the image and, through one function (`warp_annotations`), to every instance:
- polygons (the cheap, common case) are mapped point by point and clipped to the visible rectangle
  (Sutherland-Hodgman), then their box is recomputed from the clipped outline;
- masks that only exist as RLE travel as a `MaskCrop` (a 0/1 crop plus its offset) and are warped
  inside their own box only;
- box-only instances map their four corners and take the enclosing box.
Instances pushed out (too little area left, or smaller than `min_size` px) are dropped together with
their label and box, so labels, boxes and masks stay aligned. Masks are rasterised once, at the end,
at the network size (`rasterize`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from dfineseg.data.index import ImageRecord, polygon_area
from dfineseg.infer.preprocess import LETTERBOX_PAD_VALUE, ResizeMeta, resize_image

PAD = LETTERBOX_PAD_VALUE
MIN_VISIBLE_FRACTION = 0.1  # an instance keeping less of its (warped) area than this is dropped


@dataclass
class MaskCrop:
    """A binary mask stored only inside its box: `mask` (uint8 0/1, h x w) placed at (x0, y0)."""

    mask: np.ndarray
    x0: int
    y0: int

    def box(self) -> np.ndarray | None:
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return None
        return np.array([xs.min() + self.x0, ys.min() + self.y0, xs.max() + 1 + self.x0, ys.max() + 1 + self.y0], np.float32)


Geometry = list[np.ndarray] | MaskCrop | None


@dataclass
class Sample:
    """One image and its instances while it is being augmented (crowd instances already removed)."""

    image: np.ndarray  # uint8 HxWx3 RGB
    labels: np.ndarray  # int64 [N]
    boxes: np.ndarray  # float32 [N,4] xyxy pixels
    geoms: list[Geometry]  # per instance: polygons, a MaskCrop, or None (box only)
    image_id: int = 0
    orig_size: tuple[int, int] = (0, 0)
    meta: ResizeMeta | None = None
    masks: np.ndarray | None = None  # bool [N,H,W], set by `rasterize`

    @property
    def has_mask(self) -> np.ndarray:
        return np.array([g is not None for g in self.geoms], dtype=bool)

    def __len__(self) -> int:
        return len(self.labels)


def sample_from_record(record: ImageRecord, image: np.ndarray) -> Sample:
    """Build a `Sample` from a parsed record and its decoded image; crowd instances are not targets."""
    labels, boxes, geoms = [], [], []
    h, w = image.shape[:2]
    for inst in record.instances:
        if inst.iscrowd:
            continue
        geom: Geometry = None
        if inst.polygons is not None:
            geom = [p.astype(np.float64) for p in inst.polygons]
        elif inst.rle is not None:
            from pycocotools import mask as mask_utils

            full = mask_utils.decode(inst.rle)
            ys, xs = np.nonzero(full)
            if len(xs) == 0:
                continue
            x0, y0 = int(xs.min()), int(ys.min())
            geom = MaskCrop(np.ascontiguousarray(full[y0 : ys.max() + 1, x0 : xs.max() + 1]), x0, y0)
        labels.append(inst.label)
        boxes.append(inst.box_xyxy)
        geoms.append(geom)
    return Sample(
        image=image,
        labels=np.array(labels, dtype=np.int64),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        geoms=geoms,
        image_id=record.image_id,
        orig_size=(h, w),
    )


# ---------------------------------------------------------------- geometry helpers
def _to3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def affine_for_pixel_indices(m: np.ndarray) -> np.ndarray:
    """Continuous-coordinate map -> the map OpenCV's warpAffine uses (pixel centres at integers)."""
    a = m[:, :2]
    t = m[:, 2] + a @ np.array([0.5, 0.5]) - 0.5
    return np.hstack([a, t[:, None]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _clip_edge(p: np.ndarray, axis: int, value: float, keep_greater: bool) -> np.ndarray:
    """One Sutherland-Hodgman pass: keep the side of the line `x[axis] = value`."""
    d = p[:, axis] - value if keep_greater else value - p[:, axis]
    inside = d >= 0
    if inside.all():
        return p
    if not inside.any():
        return p[:0]
    prev, dprev, inprev = np.roll(p, 1, axis=0), np.roll(d, 1), np.roll(inside, 1)
    cross = inside != inprev
    denom = np.where(cross, dprev - d, 1.0)
    t = np.where(cross, dprev / denom, 0.0)
    inter = prev + (p - prev) * t[:, None]
    out = np.stack([inter, p], axis=1)
    keep = np.stack([cross, inside], axis=1)
    return out[keep]


def clip_polygon(p: np.ndarray, rect: Sequence[float]) -> np.ndarray:
    """Clip a polygon [K,2] to the rectangle (x0, y0, x1, y1); may return fewer than 3 points."""
    x0, y0, x1, y1 = rect
    if len(p) and p[:, 0].min() >= x0 and p[:, 1].min() >= y0 and p[:, 0].max() <= x1 and p[:, 1].max() <= y1:
        return p
    for axis, value, greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        p = _clip_edge(p, axis, value, greater)
        if len(p) == 0:
            break
    return p


def _warp_crop(crop: MaskCrop, m: np.ndarray, rect: Sequence[float]) -> MaskCrop | None:
    h, w = crop.mask.shape
    corners = _apply(m, np.array([[crop.x0, crop.y0], [crop.x0 + w, crop.y0], [crop.x0 + w, crop.y0 + h], [crop.x0, crop.y0 + h]], float))
    nx0 = max(int(np.floor(corners[:, 0].min())), int(np.floor(rect[0])))
    ny0 = max(int(np.floor(corners[:, 1].min())), int(np.floor(rect[1])))
    nx1 = min(int(np.ceil(corners[:, 0].max())), int(np.ceil(rect[2])))
    ny1 = min(int(np.ceil(corners[:, 1].max())), int(np.ceil(rect[3])))
    if nx1 <= nx0 or ny1 <= ny0:
        return None
    # Local map: source crop pixel indices -> destination crop pixel indices.
    shift_in = np.array([[1, 0, crop.x0], [0, 1, crop.y0], [0, 0, 1]], float)
    shift_out = np.array([[1, 0, -nx0], [0, 1, -ny0], [0, 0, 1]], float)
    local = affine_for_pixel_indices((shift_out @ _to3(m) @ shift_in)[:2])
    scale = abs(np.linalg.det(m[:, :2]))
    if scale < 1.0:  # downscaling: average then threshold, so thin parts survive better than nearest
        warped = cv2.warpAffine(crop.mask * 255, local, (nx1 - nx0, ny1 - ny0), flags=cv2.INTER_LINEAR, borderValue=0)
        warped = (warped >= 128).astype(np.uint8)
    else:
        warped = cv2.warpAffine(crop.mask, local, (nx1 - nx0, ny1 - ny0), flags=cv2.INTER_NEAREST, borderValue=0)
    ys, xs = np.nonzero(warped)
    if len(xs) == 0:
        return None
    return MaskCrop(
        np.ascontiguousarray(warped[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]), nx0 + int(xs.min()), ny0 + int(ys.min())
    )


def warp_annotations(
    sample: Sample,
    m: np.ndarray,
    out_hw: tuple[int, int],
    clip_rect: Sequence[float] | None = None,
    min_size: float = 2.0,
    min_visible: float = MIN_VISIBLE_FRACTION,
) -> tuple[np.ndarray, np.ndarray, list[Geometry]]:
    """Map every instance through the 2x3 map `m` into an image of size `out_hw`, clip to `clip_rect`
    (default the whole output) and drop those pushed out. Returns (labels, boxes, geoms), aligned."""
    h, w = out_hw
    rect = tuple(clip_rect) if clip_rect is not None else (0.0, 0.0, float(w), float(h))
    det = abs(float(np.linalg.det(m[:, :2])))
    labels, boxes, geoms = [], [], []
    for label, box, geom in zip(sample.labels, sample.boxes, sample.geoms):
        if geom is None:
            x0, y0, x1, y1 = (float(v) for v in box)
            pts = _apply(m, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
            full = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
            new_box = np.array(
                [max(full[0], rect[0]), max(full[1], rect[1]), min(full[2], rect[2]), min(full[3], rect[3])]
            )
            before = (full[2] - full[0]) * (full[3] - full[1])
            after = max(new_box[2] - new_box[0], 0) * max(new_box[3] - new_box[1], 0)
            new_geom: Geometry = None
        elif isinstance(geom, MaskCrop):
            before = float(geom.mask.sum()) * det
            new_geom = _warp_crop(geom, m, rect)
            if new_geom is None:
                continue
            after = float(new_geom.mask.sum())
            new_box = new_geom.box()
        else:
            parts, before, after = [], 0.0, 0.0
            for poly in geom:
                mapped = _apply(m, poly)
                before += polygon_area(mapped)
                clipped = clip_polygon(mapped, rect)
                area = polygon_area(clipped)
                if len(clipped) >= 3 and area > 0:
                    parts.append(clipped)
                    after += area
            if not parts:
                continue
            pts = np.concatenate(parts)
            new_box = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
            new_geom = parts
        if new_box is None or after <= 0 or after < min_visible * before:
            continue
        if new_box[2] - new_box[0] < min_size or new_box[3] - new_box[1] < min_size:
            continue
        labels.append(label)
        boxes.append(new_box)
        geoms.append(new_geom)
    return (
        np.array(labels, dtype=np.int64),
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        geoms,
    )


def warp_sample(sample: Sample, image: np.ndarray, m: np.ndarray, clip_rect=None, min_size: float = 2.0) -> Sample:
    """A new sample with `image` (already warped by the caller) and the instances mapped through `m`."""
    labels, boxes, geoms = warp_annotations(sample, m, image.shape[:2], clip_rect, min_size=min_size)
    return replace(sample, image=image, labels=labels, boxes=boxes, geoms=geoms, masks=None)


def draw_geometry(geom: Geometry, out: np.ndarray) -> None:
    """Draw one instance's polygons or mask crop as 1s into the uint8 image-size array `out`."""
    h, w = out.shape
    if geom is None:
        return
    if isinstance(geom, MaskCrop):
        ch, cw = geom.mask.shape
        x0, y0 = max(geom.x0, 0), max(geom.y0, 0)
        x1, y1 = min(geom.x0 + cw, w), min(geom.y0 + ch, h)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] |= geom.mask[y0 - geom.y0 : y1 - geom.y0, x0 - geom.x0 : x1 - geom.x0]
        return
    for poly in geom:
        # Vertex at continuous x sits in pixel column x - 0.5 (centre convention); 4 fractional bits.
        pts = np.round((np.asarray(poly) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(out, [pts], 1, lineType=cv2.LINE_8, shift=4)


def crop_of(full: np.ndarray) -> MaskCrop | None:
    """The MaskCrop of an image-size 0/1 mask (None when empty)."""
    rows, cols = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
    if len(rows) == 0:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return MaskCrop(np.ascontiguousarray(full[y0:y1, x0:x1].astype(np.uint8)), int(x0), int(y0))


def rasterize(sample: Sample) -> Sample:
    """Draw every mask at the sample's current size -> `sample.masks` bool [N,H,W]; a masked instance's
    box becomes its mask's pixel extent. Instances whose mask covers no pixel at this size are dropped."""
    h, w = sample.image.shape[:2]
    masks = np.zeros((len(sample), h, w), dtype=np.uint8)
    keep = np.ones(len(sample), dtype=bool)
    boxes = sample.boxes.copy()
    for i, geom in enumerate(sample.geoms):
        if geom is None:
            continue
        draw_geometry(geom, masks[i])
        rows, cols = np.nonzero(masks[i].any(axis=1))[0], np.nonzero(masks[i].any(axis=0))[0]
        keep[i] = len(rows) > 0
        if keep[i]:
            # The box is the mask's pixel extent, so box and mask agree exactly wherever they are used.
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    idx = np.nonzero(keep)[0]
    return replace(
        sample,
        labels=sample.labels[idx],
        boxes=boxes[idx],
        geoms=[sample.geoms[i] for i in idx],
        masks=masks[idx].astype(bool),
    )


# ---------------------------------------------------------------- resizing
def fit_within(sample: Sample, hw: tuple[int, int]) -> Sample:
    """Scale (keeping the aspect ratio) so the image fits inside `hw`; used before mosaic/affine so the
    expensive steps run at about the network size."""
    h0, w0 = sample.image.shape[:2]
    r = min(hw[0] / h0, hw[1] / w0)
    nw, nh = max(1, round(w0 * r)), max(1, round(h0 * r))
    if (nw, nh) == (w0, h0):
        return sample
    interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
    image = cv2.resize(sample.image, (nw, nh), interpolation=interp)
    m = np.array([[nw / w0, 0, 0], [0, nh / h0, 0]], float)
    return warp_sample(sample, image, m, min_size=0.0)


def resize_to_network(sample: Sample, imgsz: tuple[int, int], resize: str, min_size: float = 0.0) -> Sample:
    """The deployment resize (`infer.preprocess.resize_image`: stretch or letterbox), applied to the image
    and the instances; records the `ResizeMeta`."""
    image, meta = resize_image(sample.image, imgsz, resize)
    m = np.array([[meta.scale_x, 0, meta.pad_x], [0, meta.scale_y, meta.pad_y]], float)
    out = warp_sample(sample, image, m, min_size=min_size)
    out.meta = meta
    return out


# ---------------------------------------------------------------- augmentations
class Augment:
    """An augmentation applied with probability `p` until epoch `off_epoch` (None: never switched off)."""

    def __init__(self, p: float = 0.5, off_epoch: int | None = None):
        self.p = float(p)
        self.off_epoch = off_epoch
        self.enabled = True

    def set_epoch(self, epoch: int) -> None:
        self.enabled = self.off_epoch is None or epoch < self.off_epoch

    def fires(self, rng: np.random.Generator) -> bool:
        return self.enabled and self.p > 0 and rng.random() < self.p


class HorizontalFlip(Augment):
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not self.fires(rng):
            return sample
        w = sample.image.shape[1]
        m = np.array([[-1.0, 0, w], [0, 1.0, 0]])
        return warp_sample(sample, np.ascontiguousarray(sample.image[:, ::-1]), m, min_size=0.0)


class RandomAffine(Augment):
    """Scale, rotate, shear about the centre, then translate (fractions of the size); same output size."""

    def __init__(self, p=0.5, off_epoch=None, degrees=0.0, translate=0.1, scale=(0.5, 1.5), shear=0.0):
        super().__init__(p, off_epoch)
        self.degrees, self.translate, self.scale, self.shear = float(degrees), float(translate), tuple(scale), float(shear)

    def matrix(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        centre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], float)
        angle = rng.uniform(-self.degrees, self.degrees)
        s = rng.uniform(*self.scale)
        rot = _to3(cv2.getRotationMatrix2D((0, 0), angle, s))
        sx, sy = np.tan(np.radians(rng.uniform(-self.shear, self.shear, size=2)))
        shear = np.array([[1, sx, 0], [sy, 1, 0], [0, 0, 1]], float)
        tx = w * (0.5 + rng.uniform(-self.translate, self.translate))
        ty = h * (0.5 + rng.uniform(-self.translate, self.translate))
        move = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], float)
        return (move @ shear @ rot @ centre)[:2]

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not self.fires(rng):
            return sample
        h, w = sample.image.shape[:2]
        m = self.matrix(h, w, rng)
        image = cv2.warpAffine(
            sample.image, affine_for_pixel_indices(m), (w, h), flags=cv2.INTER_LINEAR, borderValue=(PAD, PAD, PAD)
        )
        return warp_sample(sample, image, m)


class RandomMosaic(Augment):
    """Four images around a random centre on a 2H x 2W canvas, then a random window (H..2H) around the
    centre. Each image's instances are clipped to the part of it that is visible in the window."""

    def __init__(self, p=0.5, off_epoch=None, load_random: Callable[[np.random.Generator], Sample] | None = None):
        super().__init__(p, off_epoch)
        self.load_random = load_random

    def __call__(self, sample: Sample, rng: np.random.Generator, hw: tuple[int, int]) -> Sample:
        if self.load_random is None or not self.fires(rng):
            return sample
        h, w = hw
        parts = [fit_within(sample, hw)] + [fit_within(self.load_random(rng), hw) for _ in range(3)]
        xc, yc = int(rng.uniform(0.5 * w, 1.5 * w)), int(rng.uniform(0.5 * h, 1.5 * h))
        frac = rng.uniform(0.5, 1.0)
        cw, ch = max(1, round(2 * w * frac)), max(1, round(2 * h * frac))
        cx0 = int(np.clip(xc - cw // 2, 0, 2 * w - cw))
        cy0 = int(np.clip(yc - ch // 2, 0, 2 * h - ch))
        canvas = np.full((2 * h, 2 * w, 3), PAD, dtype=np.uint8)
        labels, boxes, geoms = [], [], []
        for k, part in enumerate(parts):
            ph, pw = part.image.shape[:2]
            # Quadrant k: the image's corner touches the centre (top-left image ends at the centre, ...).
            x0 = xc - pw if k in (0, 2) else xc
            y0 = yc - ph if k in (0, 1) else yc
            vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x0 + pw, 2 * w), min(y0 + ph, 2 * h)
            if vx1 <= vx0 or vy1 <= vy0:
                continue
            canvas[vy0:vy1, vx0:vx1] = part.image[vy0 - y0 : vy1 - y0, vx0 - x0 : vx1 - x0]
            m = np.array([[1.0, 0, x0 - cx0], [0, 1.0, y0 - cy0]])
            rect = (max(vx0, cx0) - cx0, max(vy0, cy0) - cy0, min(vx1, cx0 + cw) - cx0, min(vy1, cy0 + ch) - cy0)
            if rect[2] <= rect[0] or rect[3] <= rect[1]:
                continue
            lab, box, geo = warp_annotations(part, m, (ch, cw), rect)
            labels.append(lab)
            boxes.append(box)
            geoms += geo
        image = np.ascontiguousarray(canvas[cy0 : cy0 + ch, cx0 : cx0 + cw])
        return replace(
            sample,
            image=image,
            labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
            boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
            geoms=geoms,
            masks=None,
        )


class Photometric(Augment):
    """Brightness, contrast, gamma (one lookup table), HSV jitter, and occasional blur and noise."""

    def __init__(self, p=0.5, off_epoch=None, brightness=0.2, contrast=0.2, hsv_h=0.015, hsv_s=0.5, hsv_v=0.3,
                 gamma=0.2, blur_p=0.05, noise_p=0.05):
        super().__init__(p, off_epoch)
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma
        self.hsv = (hsv_h, hsv_s, hsv_v)
        self.blur_p, self.noise_p = blur_p, noise_p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not self.fires(rng):
            return sample
        img = sample.image
        x = np.arange(256, dtype=np.float32) / 255.0
        g = 2.0 ** rng.uniform(-self.gamma, self.gamma)
        a = 1.0 + rng.uniform(-self.contrast, self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        lut = np.clip(((x**g - 0.5) * a + 0.5 + b) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = cv2.LUT(img, lut)
        if any(self.hsv):
            gains = rng.uniform(-1, 1, 3) * np.array(self.hsv) + 1
            hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
            r = np.arange(256, dtype=np.float32)
            lut_h = ((r * gains[0]) % 180).astype(np.uint8)
            lut_s = np.clip(r * gains[1], 0, 255).astype(np.uint8)
            lut_v = np.clip(r * gains[2], 0, 255).astype(np.uint8)
            hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if rng.random() < self.blur_p:
            k = int(rng.choice([3, 5]))
            img = cv2.GaussianBlur(img, (k, k), 0)
        if rng.random() < self.noise_p:
            noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 8))
            img = cv2.convertScaleAbs(img.astype(np.float32) + noise)
        return replace(sample, image=np.ascontiguousarray(img))


class TrainAugment:
    """The training pipeline: mosaic -> mixup -> cutmix -> copy-paste -> affine -> horizontal flip ->
    photometric (each optional; the mixing steps are off by default).

    `set_epoch(epoch, epochs)` switches each step off at its `off_epoch`, and the strong ones (mosaic,
    affine, photometric) for the last `no_aug_last_epochs` epochs when the total is given.
    """

    def __init__(self, cfg=None, load_random: Callable[[np.random.Generator], Sample] | None = None):
        if cfg is None:
            from dfineseg.config import AugmentConfig

            cfg = AugmentConfig()
        self.cfg = cfg
        self.mosaic = RandomMosaic(cfg.mosaic.p, cfg.mosaic.off_epoch, load_random)
        a = cfg.affine
        self.affine = RandomAffine(a.p, a.off_epoch, a.degrees, a.translate, a.scale, a.shear)
        self.hflip = HorizontalFlip(cfg.hflip.p, cfg.hflip.off_epoch)
        ph = cfg.photometric
        self.photometric = Photometric(
            ph.p, ph.off_epoch, ph.brightness, ph.contrast, ph.hsv_h, ph.hsv_s, ph.hsv_v, ph.gamma, ph.blur_p, ph.noise_p
        )
        self.no_aug_last_epochs = int(getattr(cfg, "no_aug_last_epochs", 0) or 0)
        from dfineseg.data.mixing import CopyPaste, CutMix, MixUp

        self.mixing = [
            cls(step.p, step.off_epoch, load_random)
            for cls, step in ((MixUp, cfg.mixup), (CutMix, cfg.cutmix), (CopyPaste, cfg.copy_paste))
        ]

    @property
    def steps(self) -> list[Augment]:
        return [self.mosaic, *self.mixing, self.affine, self.hflip, self.photometric]

    def set_epoch(self, epoch: int, epochs: int | None = None) -> None:
        for step in self.steps:
            step.set_epoch(epoch)
        if epochs is not None and self.no_aug_last_epochs and epoch >= epochs - self.no_aug_last_epochs:
            for step in (self.mosaic, *self.mixing, self.affine, self.photometric):
                step.enabled = False

    def __call__(self, sample: Sample, rng: np.random.Generator, hw: tuple[int, int]) -> Sample:
        sample = self.mosaic(sample, rng, hw)
        for step in self.mixing:  # each combines this image with another training image (seed 003 section 5)
            sample = step(sample, rng, hw)
        if sample.image.shape[0] > 2 * hw[0] or sample.image.shape[1] > 2 * hw[1]:
            sample = fit_within(sample, (2 * hw[0], 2 * hw[1]))  # keep the affine warp cheap on big photos
        sample = self.affine(sample, rng)
        sample = self.hflip(sample, rng)
        return self.photometric(sample, rng)
