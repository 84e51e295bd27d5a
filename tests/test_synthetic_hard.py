"""The harder generated dataset (`dfineseg data synth OUT --hard`): deterministic bytes, the promised
image sizes, object counts, sizes and shapes, and labels whose filling gives back the visible masks
(holes and occluded pieces included) under both the training and the evaluation rasteriser."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from dfineseg.data import load_index, read_image
from dfineseg.data.checks import run_check
from dfineseg.data.synthetic import write_synthetic_dataset
from dfineseg.data.synthetic_hard import (
    CLASSES,
    IMAGE_H,
    IMAGE_W,
    MIN_OBJECT,
    OBJECTS,
    mask_polygon,
    synth_hard_image,
)
from dfineseg.data.transforms import rasterize, sample_from_record


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_hard_set_same_seed_same_bytes_and_loads_cleanly(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n_train=3, n_val=2, coco=True, seed=7, hard=True)
    b = write_synthetic_dataset(tmp_path / "b", n_train=3, n_val=2, coco=True, seed=7, hard=True)
    c = write_synthetic_dataset(tmp_path / "c", n_train=3, n_val=2, coco=True, seed=8, hard=True)
    da, db, dc = _digest(a.parent), _digest(b.parent), _digest(c.parent)
    assert da == db
    assert all(da[k] != dc[k] for k in da if k.startswith("images/"))
    yolo = load_index(a, "train")
    coco = load_index(a.parent / "annotations" / "instances_train.json", "train")
    assert yolo.names == list(CLASSES) == coco.names and not yolo.problems and not coco.problems
    assert [len(r.instances) for r in yolo.images] == [len(r.instances) for r in coco.images]
    assert not run_check(str(a), splits=["train", "val"]).fatal


def test_hard_images_have_the_promised_sizes_objects_and_shapes():
    sizes, counts, classes, diameters = [], [], [], []
    for i in range(40):
        img, cls, visible, quality = synth_hard_image(np.random.default_rng([0, 1, i]))
        h, w = img.shape[:2]
        sizes.append((h, w))
        counts.append(len(cls))
        classes.extend(cls)
        assert 85 <= quality <= 95
        for m in visible:
            ys, xs = np.nonzero(m)
            diameters.append(max(np.ptp(xs), np.ptp(ys)) + 1)
    assert all(IMAGE_H[0] <= h <= IMAGE_H[1] and IMAGE_W[0] <= w <= IMAGE_W[1] for h, w in sizes)
    assert min(counts) >= 1 and max(counts) <= OBJECTS[1] and np.mean(counts) >= 4
    assert set(classes) == set(range(len(CLASSES)))
    diameters = np.array(diameters)
    # log-uniform from ~15 px: many small objects, some large (visible extents, so occlusion can shrink them)
    assert diameters.min() <= 2 * MIN_OBJECT and (diameters < 48).mean() >= 0.3 and diameters.max() >= 120


def test_labels_give_back_the_visible_masks_holes_and_pieces_included():
    """One polygon per object; filled by the evaluation's rasteriser (pycocotools) it is the visible mask,
    and by the training one (OpenCV, boundary pixels included) within a pixel's rim."""
    coco_iou, train_iou, holes, pieces = [], [], 0, 0
    for i in range(25):
        img, cls, visible, _ = synth_hard_image(np.random.default_rng([3, 1, i]))
        h, w = img.shape[:2]
        for m in visible:
            n_parts, _ = cv2.connectedComponents(m.astype(np.uint8))
            contours, hierarchy = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
            holes += int((hierarchy[0][:, 3] >= 0).sum())
            pieces += int(n_parts - 2 > 0)
            poly = mask_polygon(m)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w))
            got = mask_utils.decode(rle).astype(bool)
            coco_iou.append((got & m).sum() / (got | m).sum())
            filled = np.zeros((h, w), np.uint8)
            cv2.fillPoly(filled, [np.round((poly - 0.5) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
            filled = filled.astype(bool)
            train_iou.append((filled & m).sum() / (filled | m).sum())
    assert holes >= 5 and pieces >= 1, "rings must have holes and occlusion must split some objects"
    assert np.median(coco_iou) >= 0.99 and min(coco_iou) >= 0.9
    assert np.median(train_iou) >= 0.99 and min(train_iou) >= 0.85


def test_a_ring_label_keeps_its_hole_through_the_training_path(tmp_path):
    data = write_synthetic_dataset(tmp_path / "h", n_train=12, n_val=0, seed=2, hard=True)
    index = load_index(data, "train")
    ring = CLASSES.index("ring")
    found = 0
    for rec in index.images:
        sample = rasterize(sample_from_record(rec, read_image(rec.file)))
        for inst, mask in zip(rec.instances, sample.masks):
            if inst.label != ring:
                continue
            filled = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
            contours, hierarchy = cv2.findContours(filled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
            found += int(hierarchy is not None and (hierarchy[0][:, 3] >= 0).any())
    assert found >= 3


def test_cli_hard_defaults_and_bad_counts(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "dfineseg", "data", "synth", str(out), "--hard", "--train", "2",
                           "--val", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 train + 1 val images" in proc.stdout
    assert "ring" in (out / "data.yaml").read_text() and len(list((out / "images" / "train").glob("*.jpg"))) == 2
    bad = subprocess.run([sys.executable, "-m", "dfineseg", "data", "synth", str(tmp_path / "x"), "--train", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--train and --val count images" in (bad.stderr + bad.stdout)
