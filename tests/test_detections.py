"""The Detections type: compact masks, full masks, RLE, COCO and YOLO output, selection."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from dfineseg.infer.detections import Detections, crop_rle, integer_boxes


def _random_detections(rng, n=6, shape=(37, 53)):
    h0, w0 = shape
    x1 = rng.uniform(-5, w0 - 2, n)
    y1 = rng.uniform(-5, h0 - 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w0, n), y1 + rng.uniform(1, h0, n)], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w0)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h0)
    # One box spanning the full height, so RLE runs continue across columns.
    boxes[0] = [3.5, 0, 20.2, h0]
    rects = integer_boxes(boxes, shape)
    masks = [rng.random((r[3] - r[1], r[2] - r[0])) > 0.4 for r in rects]
    masks[0][:] = True
    return Detections(boxes, rng.random(n), rng.integers(0, 3, n), shape, masks=masks, mask_origins=rects[:, :2])


def test_fields_are_normalised():
    d = Detections([[1, 2, 3, 4]], [0.5], [2], (10, 20))
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.labels.dtype == np.int64
    assert len(d) == 1 and d.masks is None
    with pytest.raises(ValueError, match="equal length"):
        Detections([[1, 2, 3, 4]], [0.5, 0.4], [2], (10, 20))
    with pytest.raises(ValueError, match="no masks"):
        d.full_masks()


def test_full_masks_place_each_crop_at_its_box():
    rng = np.random.default_rng(1)
    d = _random_detections(rng)
    full = d.full_masks()
    assert full.shape == (len(d), 37, 53) and full.dtype == bool
    for i, (m, (x0, y0)) in enumerate(zip(d.masks, d.mask_origins)):
        h, w = m.shape
        assert (full[i, y0 : y0 + h, x0 : x0 + w] == m).all()
        assert full[i].sum() == m.sum()  # nothing outside the crop


def test_rle_equals_pycocotools_encoding_of_full_masks():
    rng = np.random.default_rng(2)
    for _ in range(5):
        d = _random_detections(rng, n=8)
        full = d.full_masks()
        expected = mask_util.encode(np.asfortranarray(full.transpose(1, 2, 0).astype(np.uint8)))
        got = d.rle()
        assert [g["counts"] for g in got] == [e["counts"] for e in expected]
        assert all(list(g["size"]) == [37, 53] for g in got)
    # Empty and full-image crops.
    assert mask_util.decode(crop_rle(np.zeros((0, 0), bool), (0, 0), (4, 5))).sum() == 0
    full_img = np.ones((4, 5), bool)
    assert (mask_util.decode(crop_rle(full_img, (0, 0), (4, 5))) == 1).all()


def test_indexing_and_filter():
    rng = np.random.default_rng(3)
    d = _random_detections(rng, n=5)
    keep = np.array([True, False, True, False, True])
    sub = d[keep]
    assert len(sub) == 3
    assert np.array_equal(sub.scores, d.scores[keep])
    assert all(np.array_equal(a, b) for a, b in zip(sub.masks, [d.masks[0], d.masks[2], d.masks[4]]))
    assert np.array_equal(sub.mask_origins, d.mask_origins[keep])
    assert np.array_equal(d[[4, 0]].labels, d.labels[[4, 0]])
    assert len(d[1:3]) == 2 and len(d[2]) == 1
    assert len(d.filter(np.zeros(5, bool))) == 0
    with pytest.raises(IndexError):
        d[np.ones(3, bool)]


def test_empty():
    e = Detections.empty((7, 9), with_masks=True)
    assert len(e) == 0 and e.full_masks().shape == (0, 7, 9) and e.rle() == [] and e.to_coco(1, [5]) == []
    assert Detections.empty((7, 9)).masks is None


def test_to_coco_maps_category_ids_and_encodes_masks():
    rng = np.random.default_rng(4)
    d = _random_detections(rng, n=4)
    cat_ids = [11, 27, 90]
    entries = d.to_coco(42, cat_ids)
    assert len(entries) == 4
    full = d.full_masks()
    for i, e in enumerate(entries):
        assert e["image_id"] == 42
        assert e["category_id"] == cat_ids[int(d.labels[i])]
        x1, y1, x2, y2 = d.boxes[i]
        np.testing.assert_allclose(e["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=2e-3)
        assert abs(e["score"] - float(d.scores[i])) < 1e-6
        assert isinstance(e["segmentation"]["counts"], str)
        decoded = mask_util.decode({"size": e["segmentation"]["size"], "counts": e["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), full[i])
    with pytest.raises(ValueError, match="category id"):
        d.to_coco(1, [1])


def test_yolo_lines_segment_and_detect():
    img_shape = (100, 200)
    mask = np.zeros((40, 80), bool)
    mask[10:30, 20:60] = True  # a rectangle inside the box
    d = Detections([[50, 20, 130, 60]], [0.9], [2], img_shape, masks=[mask], mask_origins=[[50, 20]])
    (line,) = d.to_yolo_lines()
    parts = line.split()
    assert parts[0] == "2"
    xy = np.array(parts[1:], dtype=float).reshape(-1, 2) * [200, 100]
    np.testing.assert_allclose([xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max()], [70, 109, 30, 49])
    det = Detections([[50, 20, 130, 60]], [0.9], [1], img_shape)
    assert det.to_yolo_lines(with_conf=True) == ["1 0.45 0.4 0.4 0.4 0.9"]
    assert det.to_yolo_lines(["a", "b"]) == ["1 0.45 0.4 0.4 0.4"]
    with pytest.raises(ValueError, match="no name"):
        det.to_yolo_lines(["a"])
    # An empty mask still yields one line (its box), so lines and detections stay aligned.
    empty = Detections([[50, 20, 130, 60]], [0.9], [0], img_shape, masks=[np.zeros((40, 80), bool)])
    assert len(empty.to_yolo_lines()[0].split()) == 9
