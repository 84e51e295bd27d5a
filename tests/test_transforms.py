"""Augmentation invariants (property-based): after any transform every mask lies inside its box, boxes
lie inside the image and are smaller than it, and labels/boxes/masks stay aligned with the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfineseg.config import AugmentConfig
from dfineseg.data.index import polygon_area
from dfineseg.data.transforms import (
    HorizontalFlip,
    MaskCrop,
    Photometric,
    RandomAffine,
    RandomMosaic,
    Sample,
    TrainAugment,
    clip_polygon,
    rasterize,
    resize_to_network,
    warp_annotations,
)

BACKGROUND = (30, 30, 30)
PAD = (114, 114, 114)


# 25 colours at least 100 apart per channel step, none close to the background or the padding.
_PALETTE = [(r, g, b) for r in (50, 150, 250) for g in (50, 150, 250) for b in (50, 150, 250)
            if (r, g, b) not in ((50, 50, 50), (150, 150, 150))]


def colour(label: int) -> tuple[int, int, int]:
    return _PALETTE[label % len(_PALETTE)]


def make_sample(rng: np.random.Generator, h: int, w: int, n: int, id_base: int = 0) -> Sample:
    """Up to 6 non-overlapping objects (polygon, RLE-style mask crop, or box only), each painted in its
    own colour, so alignment can be checked from the pixels."""
    import cv2

    image = np.full((h, w, 3), BACKGROUND, np.uint8)
    labels, boxes, geoms = [], [], []
    cells = [(r, c) for r in range(2) for c in range(3)]
    ch, cw = h / 2, w / 3
    for k in range(n):
        r, c = cells[k]
        label = id_base + k
        cx, cy = (c + 0.5) * cw, (r + 0.5) * ch
        rad = min(ch, cw) * rng.uniform(0.2, 0.45)
        kind = rng.integers(0, 3)
        if kind == 0:  # polygon
            # fat shapes: a sliver thinner than a pixel is in the mask at a larger scale but not in the pixels
            k_pts = int(rng.integers(3, 9))
            t = np.linspace(0, 2 * np.pi, k_pts, endpoint=False) + rng.uniform(0, 0.5, k_pts)
            radius = rad * rng.uniform(0.6, 1.0, len(t))
            poly = np.stack([cx + np.cos(t) * radius, cy + np.sin(t) * radius], axis=1)
            if polygon_area(poly) < 4:
                continue
            tmp = Sample(image[:, :, 0], np.array([label]), np.zeros((1, 4), np.float32), [[poly]])
            m = rasterize(tmp).masks
            if len(m) == 0:
                continue
            image[m[0]] = colour(label)
            ys, xs = np.nonzero(m[0])
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            geom = [poly]
        elif kind == 1:  # a mask only known as pixels (what an RLE becomes)
            full = np.zeros((h, w), np.uint8)
            cv2.ellipse(full, (int(cx), int(cy)), (max(1, int(rad)), max(1, int(rad * 0.6))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
            ys, xs = np.nonzero(full)
            image[full.astype(bool)] = colour(label)
            x0, y0 = xs.min(), ys.min()
            geom = MaskCrop(full[y0 : ys.max() + 1, x0 : xs.max() + 1].copy(), int(x0), int(y0))
            box = [x0, y0, xs.max() + 1, ys.max() + 1]
        else:  # box only
            x0, y0 = int(cx - rad), int(cy - rad * 0.7)
            x1, y1 = int(cx + rad) + 1, int(cy + rad * 0.7) + 1
            image[y0:y1, x0:x1] = colour(label)
            box, geom = [x0, y0, x1, y1], None
        labels.append(label)
        boxes.append(box)
        geoms.append(geom)
    return Sample(image, np.array(labels, np.int64), np.array(boxes, np.float32).reshape(-1, 4), geoms, orig_size=(h, w))


def check_invariants(s: Sample, allowed: set[int], check_colours: bool) -> None:
    h, w = s.image.shape[:2]
    n = len(s.labels)
    assert s.boxes.shape == (n, 4) and len(s.geoms) == n and s.masks.shape == (n, h, w)
    assert len(set(s.labels.tolist())) == n and set(s.labels.tolist()) <= allowed
    b = s.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert ((b[:, 2] - b[:, 0]) <= w).all() and ((b[:, 3] - b[:, 1]) <= h).all()
    palette = {int(lab): np.array(colour(int(lab)), float) for lab in s.labels}
    for k in range(n):
        mask = s.masks[k]
        if not s.has_mask[k]:
            assert not mask.any()
            continue
        ys, xs = np.nonzero(mask)
        assert len(xs)
        x0, y0, x1, y1 = b[k]
        assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
        if check_colours and len(xs) >= 60:  # small masks are mostly edge pixels blended by resizing
            pixels = s.image[ys, xs].astype(float)
            refs = np.array([palette[k2] for k2 in sorted(palette)] + [BACKGROUND, PAD], float)
            nearest = np.argmin(((pixels[:, None, :] - refs[None]) ** 2).sum(-1), axis=1)
            own = sorted(palette).index(int(s.labels[k]))
            assert (nearest == own).mean() > 0.5, f"mask of label {s.labels[k]} is not on its object"


def _cfg_all_on(degrees: float, shear: float) -> AugmentConfig:
    cfg = AugmentConfig()
    cfg.mosaic.p = cfg.affine.p = cfg.hflip.p = cfg.photometric.p = 1.0
    cfg.affine.degrees, cfg.affine.shear = degrees, shear
    cfg.photometric.blur_p = cfg.photometric.noise_p = 1.0
    return cfg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    which=st.sampled_from(["flip", "affine", "mosaic", "photometric", "pipeline", "none"]),
    h=st.integers(48, 120),
    w=st.integers(48, 120),
    n=st.integers(0, 6),
    degrees=st.floats(0, 45),
    shear=st.floats(0, 15),
    translate=st.floats(0, 0.5),
    scale=st.tuples(st.floats(0.3, 1.0), st.floats(1.0, 2.0)),
    net=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    resize=st.sampled_from(["stretch", "letterbox"]),
)
def test_transform_invariants(seed, which, h, w, n, degrees, shear, translate, scale, net, resize):
    rng = np.random.default_rng(seed)
    sample = make_sample(rng, h, w, n)
    allowed = set(sample.labels.tolist())
    hw = (32 * net[0], 32 * net[1])

    sources = [0]

    def other(r: np.random.Generator) -> Sample:
        sources[0] += 1  # labels 6*source.. keep every object of a mosaic distinct (and its colour too)
        s = make_sample(r, int(r.integers(40, 100)), int(r.integers(40, 100)), int(r.integers(0, 7)), 6 * sources[0])
        allowed.update(s.labels.tolist())
        return s

    if which == "flip":
        out = HorizontalFlip(p=1.0)(sample, rng)
    elif which == "affine":
        out = RandomAffine(1.0, None, degrees, translate, scale, shear)(sample, rng)
    elif which == "mosaic":
        out = RandomMosaic(1.0, None, other)(sample, rng, hw)
    elif which == "photometric":
        out = Photometric(1.0, None, blur_p=1.0, noise_p=1.0)(sample, rng)
    elif which == "pipeline":
        out = TrainAugment(_cfg_all_on(degrees, shear), load_random=other)(sample, rng, hw)
    else:
        out = sample
    final = rasterize(resize_to_network(out, hw, resize, min_size=2.0))
    assert final.image.shape == (*hw, 3) and final.meta is not None
    check_invariants(final, allowed, check_colours=which in ("flip", "affine", "mosaic", "none"))


def test_flip_moves_masks_with_pixels():
    rng = np.random.default_rng(3)
    sample = make_sample(rng, 64, 96, 6)
    out = rasterize(HorizontalFlip(p=1.0)(sample, rng))
    ref = rasterize(sample)
    assert out.labels.tolist() == ref.labels.tolist()
    mirrored = ref.masks[:, :, ::-1]
    # identical up to polygon-edge rounding (OpenCV rounds half-way vertices up, which is not mirror-symmetric)
    assert (out.masks ^ mirrored).sum() <= 0.02 * mirrored.sum()
    for k, geom in enumerate(sample.geoms):
        if not isinstance(geom, list):
            np.testing.assert_array_equal(out.masks[k], mirrored[k])  # mask crops flip exactly
    check_invariants(out, set(ref.labels.tolist()), check_colours=True)


def test_clip_polygon_and_dropping_keeps_alignment():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    assert polygon_area(clip_polygon(square, (5, 5, 20, 20))) == pytest.approx(25)
    assert len(clip_polygon(square, (20, 20, 30, 30))) == 0
    concave = np.array([[0, 0], [10, 0], [10, 10], [5, 2], [0, 10]], float)  # a "V" cut by the top edge
    assert polygon_area(clip_polygon(concave, (0, 0, 10, 6))) == pytest.approx(polygon_area(concave) - 2 * 0.5 * 4 * 2.5)
    s = Sample(
        np.zeros((50, 50, 3), np.uint8),
        np.array([3, 4, 5]),
        np.array([[0, 0, 10, 10], [30, 30, 40, 40], [20, 0, 30, 10]], np.float32),
        [[square], [square + 30], None],
    )
    m = np.array([[1.0, 0, 25], [0, 1.0, 25]])  # shifts the second object out of a 50x50 image
    labels, boxes, geoms = warp_annotations(s, m, (50, 50))
    assert labels.tolist() == [3, 5]
    np.testing.assert_allclose(boxes, [[25, 25, 35, 35], [45, 25, 50, 35]])  # the box-only one is clipped
    assert isinstance(geoms[0], list) and geoms[1] is None


def test_polygon_and_mask_paths_agree_under_affine():
    """The same shape given as a polygon and as a mask crop (RLE path) ends up as the same mask."""
    rng = np.random.default_rng(0)
    poly = np.array([[20, 15], [70, 20], [60, 60], [25, 50]], float)
    base = Sample(np.zeros((80, 90, 3), np.uint8), np.array([0]), np.zeros((1, 4), np.float32), [[poly]])
    full = rasterize(base).masks[0]
    ys, xs = np.nonzero(full)
    crop = MaskCrop(full[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8), int(xs.min()), int(ys.min()))
    two = Sample(base.image, np.array([0, 1]), np.repeat(rasterize(base).boxes, 2, 0), [[poly], crop])
    aff = RandomAffine(1.0, None, degrees=30, translate=0.1, scale=(0.7, 1.3), shear=5)
    out = rasterize(resize_to_network(aff(two, rng), (64, 96), "letterbox"))
    assert out.labels.tolist() == [0, 1]
    a, b = out.masks
    assert (a & b).sum() / (a | b).sum() > 0.85


def test_set_epoch_switches_augmentations_off():
    rng = np.random.default_rng(0)
    sample = make_sample(rng, 64, 64, 3)
    flip = HorizontalFlip(p=1.0, off_epoch=3)
    flip.set_epoch(2)
    assert not np.array_equal(flip(sample, rng).image, sample.image)
    flip.set_epoch(3)
    assert flip(sample, rng) is sample
    cfg = _cfg_all_on(10, 0)
    cfg.no_aug_last_epochs = 2
    aug = TrainAugment(cfg, load_random=lambda r: make_sample(r, 64, 64, 2, 100))
    aug.set_epoch(7, epochs=10)
    assert all(step.enabled for step in aug.steps)
    aug.set_epoch(8, epochs=10)
    # mosaic, mixup, cutmix, copy-paste, affine off; hflip stays on; photometric off
    assert [step.enabled for step in aug.steps] == [False, False, False, False, False, True, False]


def test_collate_stacks_one_size_per_batch():
    import torch

    from dfineseg.data.dataset import collate_fn

    # Multi-scale sizes (one per batch) are the training sampler's: tests/test_train.py.
    imgs, targets = collate_fn([(torch.zeros(3, 32, 64), {"a": 1}), (torch.ones(3, 32, 64), {"a": 2})])
    assert imgs.shape == (2, 3, 32, 64) and [t["a"] for t in targets] == [1, 2]
    with pytest.raises(ValueError, match="differ in size"):
        collate_fn([(torch.zeros(3, 32, 64), {}), (torch.zeros(3, 64, 64), {})])
