"""The paper's fixed-threshold protocol on cases computed by hand, against a deliberately simple
reference on random data, and COCO mAP against pycocotools."""

from __future__ import annotations

import numpy as np
import pytest

from dfineseg.infer.detections import Detections
from dfineseg.infer.metrics import GroundTruth, PaperMetrics, coco_map, compact_mask_iou, paper_metrics, sweep

SHAPE = (100, 100)


def det(boxes, labels, scores=None, shape=SHAPE):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    scores = np.full(len(boxes), 0.9) if scores is None else scores
    return Detections(boxes, scores, labels, shape)


def gt(boxes, labels, crowd=None, shape=SHAPE):
    return GroundTruth(np.asarray(boxes, float).reshape(-1, 4), labels, shape, iscrowd=crowd)


def counts(preds, gts, **kw):
    m = paper_metrics(preds, gts, "detect", **kw)
    return m["tp"], m["fp"], m["fn"]


# ------------------------------------------------------------------------------------ hand cases (boxes)
def test_perfect():
    g = gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])
    m = paper_metrics([det(g.boxes, [0, 1])], [g], "detect")
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["precision"] == m["recall"] == m["f1"] == m["iou"] == 1.0


def test_class_swap_is_one_fp_and_one_fn():
    g = gt([[0, 0, 10, 10]], [0])
    m = paper_metrics([det([[0, 0, 10, 10]], [1])], [g], "detect")
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    assert m["f1"] == 0.0 and m["iou"] == 0.0


def test_duplicate_on_one_gt_highest_iou_wins():
    g = gt([[0, 0, 10, 10]], [0])
    # IoU 0.9 (box 0..10 x 0..9) and 0.7 (0..10 x 0..7); the later, better one must be the TP.
    p = det([[0, 0, 10, 7], [0, 0, 10, 9]], [0, 0], scores=np.array([0.95, 0.6]))
    m = paper_metrics([p], [g], "detect")
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["iou"] == pytest.approx(0.9 / 2)
    assert m["precision"] == 0.5 and m["recall"] == 1.0 and m["f1"] == pytest.approx(2 / 3)


def test_unmatched_gt_and_empty_image_and_no_predictions():
    g1 = gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])
    p1 = det([[0, 0, 10, 10]], [0])
    g2 = GroundTruth.empty(SHAPE)  # empty image with a false positive
    p2 = det([[5, 5, 30, 30]], [1])
    g3 = gt([[0, 0, 10, 10]], [2])  # no predictions at all
    p3 = Detections.empty(SHAPE)
    assert counts([p1], [g1]) == (1, 0, 1)
    assert counts([p2], [g2]) == (0, 1, 0)
    assert counts([p3], [g3]) == (0, 0, 1)
    m = paper_metrics([p1, p2, p3], [g1, g2, g3], "detect")
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 2)
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(1 / 3) and m["iou"] == pytest.approx(1 / 4)
    empty = paper_metrics([Detections.empty(SHAPE)], [GroundTruth.empty(SHAPE)], "detect")
    assert (empty["tp"], empty["fp"], empty["fn"], empty["f1"]) == (0, 0, 0, 0.0)


def test_iou_exactly_half_is_not_a_match():
    g = gt([[0, 0, 10, 20]], [0])
    p = det([[0, 0, 10, 10]], [0])  # inter 100, union 200
    assert counts([p], [g]) == (0, 1, 1)
    assert counts([det([[0, 0, 10, 10.5]], [0])], [g]) == (1, 0, 0)  # just above 0.5


def test_wrong_class_prediction_wins_the_greedy_match():
    """Class-agnostic matching: the best-overlapping prediction takes the object even with the wrong
    class, so the right-class one left over is an FP too (class-aware matching would give a TP)."""
    g = gt([[0, 0, 10, 10]], [0])
    p = det([[0, 0, 10, 9], [0, 0, 10, 7]], [1, 0])  # IoU 0.9 wrong class, IoU 0.7 right class
    assert counts([p], [g]) == (0, 2, 1)


def test_greedy_takes_descending_iou_not_score_order():
    g = gt([[0, 0, 10, 10], [0, 3, 10, 13]], [0, 0])
    # A (high score): IoU 7/11 with GT0, 0.8 with GT1. B (low score): 0.9 with GT1, 7/12 with GT0.
    # Descending IoU pairs B-GT1 first, then A-GT0; taking predictions by score would pair A-GT1, B-GT0.
    p = det([[0, 3, 10, 11], [0, 3, 10, 12]], [0, 0], scores=np.array([0.99, 0.6]))
    m = paper_metrics([p], [g], "detect")
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["iou"] == pytest.approx((0.9 + 7 / 11) / 2)


def test_confidence_threshold_and_class_conf():
    g = gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1])
    p = det(g.boxes, [0, 1], scores=np.array([0.8, 0.3]))
    assert counts([p], [g], conf=0.5) == (1, 0, 1)
    assert counts([p], [g], conf=0.2) == (2, 0, 0)
    assert counts([p], [g], conf=0.5, class_conf={1: 0.25}) == (2, 0, 0)


def test_crowd_regions_are_neither_fn_nor_fp():
    g = gt([[0, 0, 10, 10], [40, 40, 90, 90]], [0, 0], crowd=[False, True])
    p = det([[0, 0, 10, 10], [45, 45, 60, 60], [0, 50, 20, 70]], [0, 0, 0])
    assert counts([p], [g]) == (1, 1, 0)  # the prediction inside the crowd box is ignored


def test_per_class_and_confusion_matrix():
    g = gt([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0, 1, 2])
    p = det([[0, 0, 10, 10], [20, 0, 30, 10], [70, 70, 80, 80]], [0, 2, 1])
    out = PaperMetrics([p], [g], "detect", num_classes=3).outcome(0.5)
    rows = out.per_class(["a", "b", "c"])
    assert [(r["tp"], r["fp"], r["fn"]) for r in rows] == [(1, 0, 0), (0, 1, 1), (0, 1, 1)]
    assert [r["instances"] for r in rows] == [1, 1, 1]
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1  # TP
    expected[1, 2] = 1  # GT b predicted as c
    expected[2, 3] = 1  # GT c missed
    expected[3, 1] = 1  # background predicted as b
    assert np.array_equal(out.confusion, expected)


# ------------------------------------------------------------------------------------ masks
def test_mask_iou_from_compact_crops_equals_full_masks():
    rng = np.random.default_rng(0)
    shape = (40, 60)

    def random_compact(n):
        crops, origins = [], []
        for _ in range(n):
            h, w = rng.integers(1, 25, 2)
            x0, y0 = rng.integers(0, shape[1] - w), rng.integers(0, shape[0] - h)
            crops.append(rng.random((h, w)) > 0.3)
            origins.append((x0, y0))
        return crops, np.array(origins)

    def full(crops, origins):
        out = np.zeros((len(crops),) + shape, bool)
        for i, (c, (x, y)) in enumerate(zip(crops, origins)):
            out[i, y : y + c.shape[0], x : x + c.shape[1]] = c
        return out

    a, oa = random_compact(7)
    b, ob = random_compact(5)
    fa, fb = full(a, oa), full(b, ob)
    ref = np.zeros((7, 5))
    for i in range(7):
        for j in range(5):
            union = (fa[i] | fb[j]).sum()
            ref[i, j] = (fa[i] & fb[j]).sum() / union if union else 0
    np.testing.assert_allclose(compact_mask_iou(a, oa, b, ob), ref)


def _masked_det(masks_full, labels, scores):
    """Detections whose crops cover each mask's box (as postprocess makes them)."""
    boxes, crops, origins = [], [], []
    for m in masks_full:
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            boxes.append([0, 0, 1, 1])
            crops.append(np.zeros((1, 1), bool))
            origins.append((0, 0))
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        boxes.append([x0, y0, x1, y1])
        crops.append(m[y0:y1, x0:x1].copy())
        origins.append((x0, y0))
    shape = masks_full.shape[1:]
    return Detections(np.array(boxes, float).reshape(-1, 4), scores, labels, shape, masks=crops, mask_origins=np.array(origins).reshape(-1, 2))


def _masked_gt(masks_full, labels):
    d = _masked_det(masks_full, labels, np.ones(len(labels)))
    return GroundTruth(d.boxes, labels, d.image_shape, masks=d.masks, mask_origins=d.mask_origins)


def test_segment_iou_exactly_half_and_mask_vs_box():
    shape = (20, 20)
    g = np.zeros((1,) + shape, bool)
    g[0, 0:10, 0:10] = True
    p = np.zeros((1,) + shape, bool)
    p[0, 0:5, 0:10] = True  # mask IoU exactly 0.5
    m = paper_metrics([_masked_det(p, [0], np.array([0.9]))], [_masked_gt(g, [0])], "segment")
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    # Same boxes, but a mask that is a thin ring: box IoU is 1, mask IoU is low -> detect TP, segment FN.
    ring = np.zeros((1,) + shape, bool)
    ring[0, 0:10, 0:10] = True
    ring[0, 1:9, 1:9] = False
    d = _masked_det(ring, [0], np.array([0.9]))
    assert paper_metrics([d], [_masked_gt(g, [0])], "detect")["tp"] == 1
    assert paper_metrics([d], [_masked_gt(g, [0])], "segment")["tp"] == 0
    with pytest.raises(ValueError, match="masks"):
        paper_metrics([det([[0, 0, 10, 10]], [0], shape=shape)], [_masked_gt(g, [0])], "segment")


# ------------------------------------------------------------------------------------ random vs reference
def reference_counts(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, conf, iou_thr=0.5):
    """The protocol written as plainly as possible, on full masks: repeatedly take the best remaining
    pair with IoU > thr among unmatched predictions and objects (O(n^2) per step)."""
    keep = [i for i in range(len(pred_scores)) if pred_scores[i] >= conf]
    iou = {}
    for i in keep:
        for j in range(len(gt_labels)):
            inter = np.logical_and(pred_masks[i], gt_masks[j]).sum()
            union = np.logical_or(pred_masks[i], gt_masks[j]).sum()
            iou[(i, j)] = inter / union if union else 0.0
    free_p, free_g = set(keep), set(range(len(gt_labels)))
    tp, iou_sum = 0, 0.0
    while True:
        best = None
        for (i, j), v in iou.items():
            if i in free_p and j in free_g and v > iou_thr and (best is None or v > best[2]):
                best = (i, j, v)
        if best is None:
            break
        i, j, v = best
        free_p.discard(i)
        free_g.discard(j)
        if pred_labels[i] == gt_labels[j]:
            tp += 1
            iou_sum += v
    fp = len(keep) - tp
    fn = len(gt_labels) - tp
    return tp, fp, fn, iou_sum


def random_scene(rng, shape=(48, 64), n_gt=None, n_pred=None, classes=3):
    """Random rectangles-with-holes objects, and predictions that are jittered copies, duplicates
    or noise, with random classes and scores."""
    h, w = shape
    n_gt = rng.integers(0, 6) if n_gt is None else n_gt
    gms = np.zeros((n_gt,) + shape, bool)
    for k in range(n_gt):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        x1, y1 = x0 + rng.integers(4, w - x0 + 1), y0 + rng.integers(4, h - y0 + 1)
        gms[k, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.1
    glab = rng.integers(0, classes, n_gt)
    n_pred = rng.integers(0, 8) if n_pred is None else n_pred
    pms = np.zeros((n_pred,) + shape, bool)
    plab = rng.integers(0, classes, n_pred)
    for k in range(n_pred):
        if n_gt and rng.random() < 0.7:
            src = rng.integers(0, n_gt)
            dy, dx = rng.integers(-2, 3, 2)
            pms[k] = np.roll(np.roll(gms[src], dy, 0), dx, 1) & (rng.random(shape) > 0.1)
            if rng.random() < 0.75:  # mostly the right class, sometimes a confusion
                plab[k] = glab[src]
        else:
            x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
            pms[k, y0 : y0 + rng.integers(3, 20), x0 : x0 + rng.integers(3, 20)] = True
    pscore = rng.random(n_pred)
    return pms, plab, pscore, gms, glab


def test_f1_equals_simple_reference_on_random_scenes():
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(40)]
    preds = [_masked_det(p, pl, ps) for p, pl, ps, _, _ in scenes]
    gts = [_masked_gt(g, gl) for _, _, _, g, gl in scenes]
    pm = PaperMetrics(preds, gts, "segment", num_classes=3)
    for conf in (0.8, 0.5, 0.3, 0.0):
        tp = fp = fn = 0
        iou_sum = 0.0
        for s in scenes:
            a, b, c, d = reference_counts(*s, conf=conf)
            tp, fp, fn, iou_sum = tp + a, fp + b, fn + c, iou_sum + d
        got = pm.outcome(conf).summary()
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), conf
        assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert got["iou"] == pytest.approx(iou_sum / (tp + fp + fn))
    assert tp > 10 and fp > 5 and fn > 5  # the scenes exercise every outcome


def test_sweep_finds_best_threshold():
    g = gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])
    p = det([[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70]], [0, 0, 0], scores=np.array([0.9, 0.6, 0.4]))
    s = sweep([p], [g], "detect", thresholds=[0.3, 0.5, 0.7, 0.95])
    assert s["f1"] == pytest.approx([0.8, 1.0, 2 / 3, 0.0])
    assert s["best_conf"] == 0.5 and s["best_f1"] == 1.0
    assert s["precision"][0] == pytest.approx(2 / 3) and s["recall"][2] == 0.5


# ------------------------------------------------------------------------------------ COCO mAP
def _coco_fixture(rng, n_images=6, classes=(3, 7, 12)):
    images, anns, results = [], [], []
    from pycocotools import mask as mask_util

    for img_id in range(101, 101 + n_images):
        h, w = 40, 50
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id}.jpg"})
        p, pl, ps, g, gl = random_scene(rng, shape=(h, w), n_gt=rng.integers(1, 5), n_pred=rng.integers(0, 7))
        for k in range(len(gl)):
            ys, xs = np.nonzero(g[k])
            rle = mask_util.encode(np.asfortranarray(g[k].astype(np.uint8)))
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": classes[gl[k]], "iscrowd": 0,
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())],
                "area": float(g[k].sum()),
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            })
        d = _masked_det(p, pl, ps)
        results.extend(d.to_coco(img_id, list(classes)))
    gt_dict = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in classes]}
    return gt_dict, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_map_equals_pycocotools(iou_type, tmp_path):
    import contextlib
    import copy
    import io
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(11)
    gt_dict, results = _coco_fixture(rng)
    assert len(results) > 5
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    gt_file.write_text(json.dumps(gt_dict))
    res_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(res_file)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    before = copy.deepcopy(results)
    ours = coco_map(json.loads(gt_file.read_text()), json.loads(res_file.read_text()), iou_type)
    assert ours["map50_95"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert ours["map50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert 0.05 < ours["map50"] <= 1.0
    coco_map(gt_dict, results, iou_type)
    assert results == before  # the caller's entries are not modified


def test_coco_map_edge_cases():
    gt_dict, results = _coco_fixture(np.random.default_rng(3), n_images=2)
    assert coco_map(gt_dict, [], "bbox") == {"map50_95": 0.0, "map50": 0.0}
    with pytest.raises(ValueError, match="image ids"):
        coco_map(gt_dict, [{**results[0], "image_id": 999}], "bbox")


def test_sweep_agrees_with_one_threshold_at_a_time():
    """The vectorised sweep and `outcome` are two codings of the same matching (crowd included)."""
    rng = np.random.default_rng(9)
    scenes = [random_scene(rng) for _ in range(30)]
    preds = [_masked_det(p, pl, ps) for p, pl, ps, _, _ in scenes]
    gts = []
    for _, _, _, g, gl in scenes:
        t = _masked_gt(g, gl)
        t.iscrowd = rng.random(len(gl)) < 0.2
        gts.append(t)
    assert sum(int(t.iscrowd.sum()) for t in gts) > 2
    pm = PaperMetrics(preds, gts, "segment", num_classes=3)
    thresholds = [0.0, 0.1, 0.33, 0.5, 0.77, 0.95]
    s = pm.sweep(thresholds)
    for i, t in enumerate(thresholds):
        one = pm.outcome(t).summary()
        assert (s["f1"][i], s["precision"][i], s["recall"][i]) == pytest.approx((one["f1"], one["precision"], one["recall"]))
        assert s["iou"][i] == pytest.approx(one["iou"])


def test_score_equal_to_threshold_is_kept_like_postprocess():
    g = gt([[0, 0, 10, 10]], [0])
    p = det([[0, 0, 10, 10]], [0], scores=np.array([0.7], np.float32))  # float32(0.7) < 0.7 in float64
    assert counts([p], [g], conf=0.7) == (1, 0, 0)
    assert sweep([p], [g], "detect", thresholds=[0.7])["f1"] == [1.0]


# ------------------------------------------------------------------------------------ boundary IoU
def _full_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Reference: mask pixels whose chessboard distance to a background pixel (outside the image counts as
    background) is at most `width`, computed on the full image by brute force."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * width, w + 2 * width), bool)
    padded[width:width + h, width:width + w] = mask
    interior = np.ones_like(mask)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            interior &= padded[width + dy:width + dy + h, width + dx:width + dx + w]
    return mask & ~interior


def test_boundary_iou_matches_a_full_image_reference():
    from dfineseg.infer.metrics import boundary_width, compact_boundary_iou

    rng = np.random.default_rng(0)
    shape = (60, 80)
    width = boundary_width(shape)
    assert width == round(0.02 * np.hypot(*shape)) == 2
    for _ in range(30):
        full = []
        for _ in range(2):
            m = np.zeros(shape, bool)
            y0, x0 = rng.integers(0, 40), rng.integers(0, 60)
            m[y0:y0 + rng.integers(3, 25), x0:x0 + rng.integers(3, 25)] = True
            m &= rng.random(shape) > 0.1  # holes make inner edges
            full.append(m)
        bands = [_full_band(m, width) for m in full]
        union = (bands[0] | bands[1]).sum()
        expected = (bands[0] & bands[1]).sum() / union if union else 0.0
        crops = []
        for m in full:
            ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
            crops.append((m[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1], (int(xs[0]), int(ys[0]))))
        got = compact_boundary_iou(crops[0][0], crops[0][1], crops[1][0], crops[1][1], width)
        assert got == pytest.approx(expected)


def test_boundary_iou_sees_edges_that_mask_iou_forgives():
    """A 60 px square predicted 3 px too far right: mask IoU 0.90, boundary IoU much lower; both reported
    for the true positive at the threshold (segment only)."""
    shape = (200, 200)
    square = np.ones((60, 60), bool)
    truth = GroundTruth([[50, 50, 110, 110]], [0], shape, [square], [[50, 50]])
    pred = Detections([[53, 50, 113, 110]], [0.9], [0], shape, [square], [[53, 50]])
    seg = paper_metrics([pred], [truth], "segment")
    assert seg["tp"] == 1 and seg["iou"] == pytest.approx(57 / 63)
    assert 0.3 < seg["boundary_iou"] < 0.75
    exact = paper_metrics([Detections([[50, 50, 110, 110]], [0.9], [0], shape, [square], [[50, 50]])], [truth], "segment")
    assert exact["boundary_iou"] == 1.0
    assert "boundary_iou" not in paper_metrics([pred], [truth], "detect")
