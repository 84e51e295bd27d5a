"""The demo dataset generator: deterministic bytes, valid YOLO + COCO that agree, learnable statistics."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from dfineseg.data import load_index
from dfineseg.data.checks import run_check
from dfineseg.data.synthetic import CLASSES, write_synthetic_dataset
from dfineseg.data.transforms import rasterize, sample_from_record


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n_train=4, n_val=2, coco=True, seed=3)
    b = write_synthetic_dataset(tmp_path / "b", n_train=4, n_val=2, coco=True, seed=3)
    c = write_synthetic_dataset(tmp_path / "c", n_train=4, n_val=2, coco=True, seed=4)
    assert a.name == "data.yaml" and a.is_file()
    da, db, dc = _digest(a.parent), _digest(b.parent), _digest(c.parent)
    assert da == db
    assert set(da) == set(dc) and all(da[k] != dc[k] for k in da if k.startswith("images/"))
    assert {"annotations/instances_train.json", "annotations/instances_val.json", "labels/val/000002.txt"} <= set(da)


def test_yolo_and_coco_agree_and_check_is_clean(tmp_path):
    data = write_synthetic_dataset(tmp_path / "s", n_train=6, n_val=3, coco=True, seed=0)
    report = run_check(str(data), stream=io.StringIO())
    assert report.ok and report.splits["train"].images == 6 and report.splits["val"].images == 3
    assert run_check(str(data.parent), stream=io.StringIO()).ok  # the same folder read as COCO
    yolo = load_index(data, "train")
    coco = load_index(data.parent, "train")
    assert yolo.names == list(CLASSES) == coco.names and coco.category_ids == [1, 2, 3, 4, 5]
    for ry, rc in zip(yolo.images, coco.images):
        assert ry.image_id == rc.image_id and (ry.width, ry.height) == (rc.width, rc.height)
        assert 320 <= ry.width <= 480 and 320 <= ry.height <= 480
        assert 1 <= len(ry.instances) <= 6
        assert [i.label for i in ry.instances] == [i.label for i in rc.instances]
        my = rasterize(sample_from_record(ry, np.zeros((ry.height, ry.width, 3), np.uint8))).masks
        mc = rasterize(sample_from_record(rc, np.zeros((rc.height, rc.width, 3), np.uint8))).masks
        for a, b in zip(my, mc):
            # YOLO keeps the largest visible part's outline; COCO the exact visible mask (RLE with holes)
            assert (a & b).sum() / (a | b).sum() > 0.8
        for inst in rc.instances:
            area = mask_utils.area(inst.rle) if inst.rle is not None else None
            side = min(rc.width, rc.height)
            w, h = inst.box_xyxy[2:] - inst.box_xyxy[:2]
            assert max(w, h) >= 0.08 * side  # medium/large objects: learnable in minutes
            assert area is None or area > 0


def test_training_batches_on_generated_data_are_multiscale(tmp_path):
    """The training data path (`training_data` + `epoch_loader`, as the trainer builds them): multi-scale
    batches of valid targets, and the epoch set on the dataset switches the last epoch's augmentations off."""
    import torch

    from dfineseg.config import build_config
    from dfineseg.train.epoch_loader import batches, epoch_loader, training_data

    data = write_synthetic_dataset(tmp_path / "s", n_train=4, n_val=0, seed=1)
    cfg = build_config({
        "data": {"path": str(data), "imgsz": 64, "workers": 0,
                 "augment": {"multiscale": {"p": 1.0, "min_frac": 0.5, "max_frac": 2.0}, "no_aug_last_epochs": 1}},
        "train": {"batch": 2, "epochs": 3},
    })
    train_set, sampler = training_data(cfg, load_index(data, "train"))
    shapes = set()
    for epoch in range(3):
        loader = epoch_loader(train_set, sampler, epoch=epoch, epoch_batch=0, total_epochs=3, seed=0,
                              device=torch.device("cpu"), workers=0)
        assert train_set.epoch == epoch
        assert train_set.augment.mosaic.enabled == (epoch < 2)  # no_aug_last_epochs: the total reached it too
        for images, targets in batches(loader):
            b, c, h, w = images.shape
            assert (b, c) == (2, 3) and h % 32 == 0 and w % 32 == 0 and 0.0 <= images.min() and images.max() <= 1.0
            shapes.add((h, w))
            for t in targets:
                n = len(t["labels"])
                assert t["masks"].shape == (n, h, w) and t["boxes"].shape == (n, 4) and t["has_mask"].shape == (n,)
                assert (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
    assert len(shapes) > 1
