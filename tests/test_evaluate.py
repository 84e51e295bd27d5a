"""`evaluate`: ground truth from dataset records, the numbers, and the files `dfineseg val` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from test_metrics import _masked_det, reference_counts

from dfineseg.data.index import DatasetIndex, ImageRecord, Instance
from dfineseg.evaluate import coco_ground_truth, evaluate, ground_truth_from_record, polygons_to_crop
from dfineseg.infer.detections import Detections
from dfineseg.infer.errors import UserError

NAMES = ["cat", "dog", "bird"]
CAT_IDS = [5, 9, 17]


def _full_polygon_mask(polys, shape):
    h, w = shape
    rles = mask_util.frPyObjects([np.asarray(p, float).reshape(-1).tolist() for p in polys], h, w)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def test_polygon_crops_equal_full_size_rasterisation():
    rng = np.random.default_rng(0)
    shape = (45, 70)
    for trial in range(60):
        n_parts = 1 + trial % 2
        polys = []
        for _ in range(n_parts):
            c = rng.uniform([-10, -10], [80, 55])
            pts = c + rng.uniform(-15, 15, (rng.integers(3, 8), 2))
            polys.append(pts.astype(np.float32))
        full = _full_polygon_mask(polys, shape)
        crop, (x0, y0) = polygons_to_crop(polys, shape)
        rebuilt = np.zeros(shape, bool)
        rebuilt[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        assert np.array_equal(rebuilt, full), trial


def _square(x, y, s):
    return np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]], np.float32)


def make_index(tmp_path: Path) -> DatasetIndex:
    """Four images: polygons (two parts for one object), an RLE object, a crowd region, a box-only
    instance, and a background image."""
    h, w = 60, 80
    rle_mask = np.zeros((h, w), bool)
    rle_mask[30:50, 40:70] = True
    rle = mask_util.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
    crowd = np.zeros((h, w), bool)
    crowd[0:20, 50:80] = True
    crowd_rle = mask_util.encode(np.asfortranarray(crowd.astype(np.uint8)))

    def inst(label, polys=None, rle=None, iscrowd=False, box=None):
        if box is None:
            if polys is not None:
                pts = np.concatenate(polys)
                box = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
            else:
                box = mask_util.toBbox(rle).tolist()
                box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
        return Instance(label, np.array(box, np.float32), polys, rle, iscrowd, polys is not None or rle is not None)

    records = [
        ImageRecord(3, tmp_path / "a.jpg", w, h, [inst(0, [_square(5, 5, 20)]), inst(1, [_square(40, 10, 12), _square(55, 30, 10)])]),
        ImageRecord(7, tmp_path / "b.jpg", w, h, [inst(2, rle=rle), inst(0, rle=crowd_rle, iscrowd=True)]),
        ImageRecord(8, tmp_path / "c.jpg", w, h, [inst(1, [_square(10, 10, 30)]), inst(2, box=[50, 5, 75, 25])]),
        ImageRecord(12, tmp_path / "d.jpg", w, h, []),
    ]
    return DatasetIndex(list(NAMES), list(CAT_IDS), records)


def perfect_predictions(index: DatasetIndex, task: str = "segment") -> dict[int, Detections]:
    preds = {}
    for rec in index.images:
        gt = ground_truth_from_record(rec, "segment")
        keep = ~gt.iscrowd
        full = np.zeros((int(keep.sum()), rec.height, rec.width), bool)
        for k, i in enumerate(np.nonzero(keep)[0]):
            (x0, y0), m = gt.mask_origins[i], gt.masks[i]
            full[k, y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] = m
        d = _masked_det(full, gt.labels[keep], np.linspace(0.9, 0.8, int(keep.sum())))
        d = Detections(gt.boxes[keep], d.scores, d.labels, d.image_shape, d.masks, d.mask_origins)
        preds[rec.image_id] = d if task == "segment" else Detections(d.boxes, d.scores, d.labels, d.image_shape)
    return preds


def test_ground_truth_from_records(tmp_path):
    index = make_index(tmp_path)
    g = ground_truth_from_record(index.images[0], "segment")
    assert len(g) == 2 and g.labels.tolist() == [0, 1]
    assert int(g.masks[1].sum()) == int(_full_polygon_mask([_square(40, 10, 12), _square(55, 30, 10)], (60, 80)).sum())
    g = ground_truth_from_record(index.images[1], "segment")
    assert g.iscrowd.tolist() == [False, True]
    assert g.masks[0].shape == (20, 30) and tuple(g.mask_origins[0]) == (40, 30) and g.masks[0].all()
    g = ground_truth_from_record(index.images[2], "segment")
    assert g.masks[1].shape == (20, 25) and g.masks[1].all()  # box-only instance counts as its box
    assert ground_truth_from_record(index.images[2], "detect").masks is None


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_perfect_predictions_score_one(tmp_path, task):
    index = make_index(tmp_path)
    m = evaluate(index, perfect_predictions(index, task), task, conf=0.5)
    head = m["headline"]
    assert (head["tp"], head["fp"], head["fn"]) == (5, 0, 0)
    assert head["f1"] == 1.0 and head["penalized_iou"] == pytest.approx(1.0)
    assert head["boundary_iou"] == (pytest.approx(1.0) if task == "segment" else None)
    assert head["map50_95"] == pytest.approx(1.0) and head["map50"] == pytest.approx(1.0)
    assert m["instances"] == 5 and m["images"] == 4
    assert ("mask" in m) == (task == "segment") and m["box"]["f1"] == 1.0
    assert [r["category_id"] for r in m["per_class"]] == CAT_IDS
    assert m["sweep"]["best_f1"] == 1.0 and m["sweep"]["best_conf"] <= 0.8


def test_evaluate_writes_files_and_predictions_rescore_to_the_same_map(tmp_path):
    from faster_coco_eval import COCO, COCOeval_faster

    index = make_index(tmp_path)
    rng = np.random.default_rng(1)
    preds = perfect_predictions(index)
    # Degrade: jitter scores, flip a label, drop an object, add a false positive.
    d3 = preds[3]
    preds[3] = Detections(d3.boxes, rng.uniform(0.3, 1, len(d3)), [0, 2], d3.image_shape, d3.masks, d3.mask_origins)
    preds[8] = preds[8][[0]]
    fp_mask = np.zeros((10, 10), bool)
    fp_mask[2:8, 2:8] = True
    preds[12] = Detections([[0, 0, 10, 10]], [0.7], [1], (60, 80), [fp_mask], [[0, 0]])
    out = tmp_path / "val"
    m = evaluate(index, preds, "segment", conf=0.5, out_dir=out)

    for name in ("metrics.json", "predictions.json", "images.json", "f1_curve.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "images.json").read_text()) == {str(r.image_id): str(r.file) for r in index.images}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["headline"] == m["headline"]

    gt_file = tmp_path / "gt.json"
    gts = [ground_truth_from_record(r, "segment") for r in index.images]
    gt_file.write_text(json.dumps(coco_ground_truth(index, gts, "segment")))
    entries = json.loads((out / "predictions.json").read_text())
    assert {e["category_id"] for e in entries} <= set(CAT_IDS) and {e["image_id"] for e in entries} <= {3, 7, 8, 12}
    for iou_type, section in (("segm", "mask"), ("bbox", "box")):
        coco_gt = COCO(str(gt_file))
        ev = COCOeval_faster(coco_gt, coco_gt.loadRes(str(out / "predictions.json")), iou_type, print_function=lambda *a: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert m[section]["map50_95"] == pytest.approx(ev.stats[0], abs=1e-9)
        assert m[section]["map50"] == pytest.approx(ev.stats[1], abs=1e-9)
    assert 0 < m["mask"]["map50_95"] < 1


def test_f1_equals_independent_reference_on_random_predictions(tmp_path):
    """evaluate's F1 (through records, crops, crowd) against the plain full-mask reference."""
    rng = np.random.default_rng(2)
    h, w = 48, 64
    records, preds, ref_scenes = [], {}, []
    for img_id in range(20):
        insts, full_gt = [], []
        for _ in range(rng.integers(0, 5)):
            x, y, s = rng.integers(0, 40), rng.integers(0, 30), rng.integers(6, 20)
            poly = _square(x, y, s) + rng.uniform(-1, 1, (4, 2)).astype(np.float32)
            label = int(rng.integers(0, 3))
            insts.append(Instance(label, np.array([x, y, x + s, y + s], np.float32), [poly], None, False, True))
            full_gt.append(_full_polygon_mask([poly], (h, w)))
        records.append(ImageRecord(100 + img_id, tmp_path / f"{img_id}.png", w, h, insts))
        gms = np.array(full_gt, bool).reshape(-1, h, w)
        glab = np.array([i.label for i in insts], np.int64)
        n = int(rng.integers(0, 7))
        pms = np.zeros((n, h, w), bool)
        plab = rng.integers(0, 3, n)
        for k in range(n):
            if len(glab) and rng.random() < 0.75:
                src = rng.integers(0, len(glab))
                pms[k] = np.roll(gms[src], tuple(rng.integers(-2, 3, 2)), (0, 1))
                plab[k] = glab[src] if rng.random() < 0.8 else plab[k]
            else:
                x, y = rng.integers(0, 50, 2)
                pms[k, y : y + 12, x : x + 12] = True
        pscore = rng.random(n)
        preds[100 + img_id] = _masked_det(pms, plab, pscore)
        ref_scenes.append((pms, plab, pscore, gms, glab))
    index = DatasetIndex(list(NAMES), list(CAT_IDS), records)
    for conf in (0.25, 0.5):
        m = evaluate(index, preds, "segment", conf=conf, plots=False)
        tp = fp = fn = 0
        for s in ref_scenes:
            a, b, c, _ = reference_counts(*s, conf=conf)
            tp, fp, fn = tp + a, fp + b, fn + c
        assert (m["mask"]["tp"], m["mask"]["fp"], m["mask"]["fn"]) == (tp, fp, fn)
        assert m["headline"]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert tp > 5 and fp > 3 and fn > 3


def test_list_predictions_class_conf_and_errors(tmp_path):
    index = make_index(tmp_path)
    preds = perfect_predictions(index)
    as_list = [preds[r.image_id] for r in index.images]
    assert evaluate(index, as_list, "segment")["headline"] == evaluate(index, preds, "segment")["headline"]
    # Missing images count as "nothing detected".
    partial = {3: preds[3]}
    assert evaluate(index, partial, "segment")["headline"]["fn"] == 3
    # Per-class threshold by name: the dog of image 3 (score 0.8) misses 0.85, the other (0.9) passes.
    m = evaluate(index, preds, "segment", class_conf={"dog": 0.85})
    assert m["headline"]["fn"] == 1 and m["class_conf"] == {"dog": 0.85}
    with pytest.raises(UserError, match="unknown class"):
        evaluate(index, preds, "segment", class_conf={"horse": 0.3})
    with pytest.raises(UserError, match="not in the dataset"):
        evaluate(index, {**preds, 99: preds[3]}, "segment")
    with pytest.raises(UserError, match=r"\(60, 80\)"):
        evaluate(index, {3: Detections.empty((61, 80), with_masks=True)}, "segment")
    with pytest.raises(UserError, match="task=detect"):
        evaluate(index, perfect_predictions(index, "detect"), "segment")
    with pytest.raises(UserError, match="3 prediction sets"):
        evaluate(index, as_list[:3], "segment")
