"""Post-processing of exported-graph outputs: thresholds, NMS, boxes back to the original image, and
masks made inside each box that agree with the naive full-image pipeline."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dfineseg.infer.detections import integer_boxes
from dfineseg.infer.postprocess import nms_class_aware, postprocess
from dfineseg.infer.preprocess import boxes_to_network, resize_image


def naive_masks(logits: np.ndarray, meta, boxes_xyxy: np.ndarray) -> np.ndarray:
    """The obvious full-image way: upsample the whole map to the input, undo the resize, resize to the
    original, threshold at 0, zero outside the (integer) box."""
    out = []
    nh, nw = meta.content_hw
    for lg, rect in zip(logits, integer_boxes(boxes_xyxy, meta.orig_shape)):
        up = cv2.resize(lg.astype(np.float32), (meta.in_w, meta.in_h), interpolation=cv2.INTER_LINEAR)
        content = up[meta.pad_y : meta.pad_y + nh, meta.pad_x : meta.pad_x + nw]
        full = cv2.resize(content, (meta.orig_w, meta.orig_h), interpolation=cv2.INTER_LINEAR) > 0
        inside = np.zeros_like(full)
        x0, y0, x1, y1 = rect
        inside[y0:y1, x0:x1] = True
        out.append(full & inside)
    return np.array(out).reshape(-1, meta.orig_h, meta.orig_w)


def _smooth_logits(rng, boxes_net, hm, wm):
    """Per query: a blob filling part of its box plus low-frequency noise, so masks have real edges."""
    k = len(boxes_net)
    yy, xx = np.mgrid[0:hm, 0:wm]
    cx = (xx + 0.5) / wm
    cy = (yy + 0.5) / hm
    out = np.empty((k, hm, wm), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes_net):
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        sx, sy = max(x2 - x1, 1e-3) / 2.5, max(y2 - y1, 1e-3) / 2.5
        blob = 1.0 - ((cx - mx) / sx) ** 2 - ((cy - my) / sy) ** 2
        noise = cv2.resize(rng.normal(size=(6, 6)).astype(np.float32), (wm, hm), interpolation=cv2.INTER_CUBIC)
        out[i] = 6 * blob + 0.8 * noise
    return out


def _outputs(rng, meta, k=12, segment=True):
    h0, w0 = meta.orig_shape
    xy = rng.uniform(0, 0.7, (k, 2)) * [w0, h0]
    wh = rng.uniform(0.1, 0.3, (k, 2)) * [w0, h0]
    boxes_orig = np.concatenate([xy, np.minimum(xy + wh, [w0, h0])], axis=1)
    boxes_net = boxes_to_network(boxes_orig, meta).astype(np.float32)
    out = {
        "scores": rng.uniform(0, 1, (1, k)).astype(np.float32),
        "labels": rng.integers(0, 3, (1, k)).astype(np.int64),
        "boxes": boxes_net[None],
    }
    if segment:
        logits = _smooth_logits(rng, boxes_net, meta.in_h // 4, meta.in_w // 4)
        # The graph's factored form: one feature channel per query and one-hot embeddings give exactly these
        # logits (`_logit_maps`).
        out["mask_features"] = np.ascontiguousarray(logits.transpose(1, 2, 0))[None]
        out["mask_embed"] = np.eye(k, dtype=np.float32)[None]
    return out, boxes_orig


def _logit_maps(outputs):
    """The (K, Hm, Wm) logit maps of image 0: embedding . features, per query."""
    return np.einsum("kc,hwc->khw", outputs["mask_embed"][0], outputs["mask_features"][0])


# Realistic proportions (a 1/4-resolution map of a few-hundred-pixel input): the two pipelines differ
# only in interpolating once vs twice, which moves mask edges by a fraction of a pixel.
@pytest.mark.parametrize("resize, orig, imgsz", [("letterbox", (540, 960), (320, 320)), ("stretch", (600, 400), (256, 320))])
def test_masks_match_naive_full_image_pipeline(resize, orig, imgsz):
    rng = np.random.default_rng(0)
    _, meta = resize_image(np.zeros(orig + (3,), np.uint8), imgsz, resize)
    outputs, _ = _outputs(rng, meta, k=16)
    (det,) = postprocess(outputs, [meta], conf=0.3)
    kept = np.nonzero(outputs["scores"][0] >= 0.3)[0]
    kept = kept[np.argsort(-outputs["scores"][0][kept])]
    assert len(det) == len(kept) > 3
    ref = naive_masks(_logit_maps(outputs)[kept], meta, det.boxes)
    full = det.full_masks()
    for i in range(len(det)):
        inter = np.logical_and(full[i], ref[i]).sum()
        union = np.logical_or(full[i], ref[i]).sum()
        assert union > 200, "test masks must be substantial"
        assert inter / union >= 0.99, (i, inter / union)


def _bilinear_at_original_pixels(logits: np.ndarray, meta) -> np.ndarray:
    """Single bilinear sample of the logit map at every original pixel centre (half-pixel convention,
    edges clamped), written independently of OpenCV."""
    hm, wm = logits.shape
    u = ((np.arange(meta.orig_w) + 0.5) * meta.scale_x + meta.pad_x) * wm / meta.in_w - 0.5
    v = ((np.arange(meta.orig_h) + 0.5) * meta.scale_y + meta.pad_y) * hm / meta.in_h - 0.5
    u, v = u.clip(0, wm - 1), v.clip(0, hm - 1)
    u0, v0 = np.floor(u).astype(int).clip(0, wm - 2), np.floor(v).astype(int).clip(0, hm - 2)
    fu, fv = (u - u0)[None, :], (v - v0)[:, None]
    g = logits.astype(np.float64)
    top = (1 - fu) * g[v0][:, u0] + fu * g[v0][:, u0 + 1]
    bottom = (1 - fu) * g[v0 + 1][:, u0] + fu * g[v0 + 1][:, u0 + 1]
    return (1 - fv) * top + fv * bottom


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_masks_sample_the_logit_map_at_the_right_place(resize):
    """Pins the coordinate chain: inside its box, each mask equals thresholding one exact bilinear
    sample per original pixel (float32 vs float64 rounding may flip a pixel sitting on logit 0)."""
    rng = np.random.default_rng(5)
    _, meta = resize_image(np.zeros((90, 170, 3), np.uint8), (64, 96), resize)
    outputs, _ = _outputs(rng, meta, k=8)
    outputs["scores"][:] = 1.0
    (det,) = postprocess(outputs, [meta], conf=0.5)
    full = det.full_masks()
    for i in range(len(det)):
        exact = _bilinear_at_original_pixels(_logit_maps(outputs)[i], meta) > 0
        x0, y0, x1, y1 = integer_boxes(det.boxes[i : i + 1], meta.orig_shape)[0]
        inside = np.zeros_like(exact)
        inside[y0:y1, x0:x1] = True
        assert not full[i][~inside].any()
        assert np.count_nonzero(full[i] != (exact & inside)) <= 1


def test_stretch_masks_equal_one_resize_of_the_whole_map():
    """With stretch resize the reference code's way (one bilinear resize of the 1/4 map straight to the
    original size, threshold, zero outside the box) is the same sampling: equal up to float rounding."""
    rng = np.random.default_rng(6)
    _, meta = resize_image(np.zeros((300, 500, 3), np.uint8), (128, 160), "stretch")
    outputs, _ = _outputs(rng, meta, k=10)
    outputs["scores"][:] = 1.0
    (det,) = postprocess(outputs, [meta], conf=0.5)
    full = det.full_masks()
    for i, rect in enumerate(integer_boxes(det.boxes, meta.orig_shape)):
        one = cv2.resize(_logit_maps(outputs)[i], (meta.orig_w, meta.orig_h), interpolation=cv2.INTER_LINEAR) > 0
        inside = np.zeros_like(one)
        inside[rect[1] : rect[3], rect[0] : rect[2]] = True
        assert np.count_nonzero(full[i] != (one & inside)) <= 2, i


def test_threshold_class_conf_and_max_det():
    rng = np.random.default_rng(1)
    _, meta = resize_image(np.zeros((100, 100, 3), np.uint8), 64, "stretch")
    outputs, _ = _outputs(rng, meta, k=6, segment=False)
    outputs["scores"][0] = [0.9, 0.6, 0.5, 0.45, 0.2, 0.55]
    outputs["labels"][0] = [0, 1, 0, 2, 2, 1]
    (d,) = postprocess(outputs, [meta], conf=0.5)
    assert d.scores.tolist() == pytest.approx([0.9, 0.6, 0.55, 0.5])  # >= conf, sorted by score
    assert d.masks is None
    (d,) = postprocess(outputs, [meta], conf=0.5, class_conf={1: 0.58, 2: 0.1})
    assert d.scores.tolist() == pytest.approx([0.9, 0.6, 0.5, 0.45, 0.2])
    (d,) = postprocess(outputs, [meta], conf=0.0, max_det=2)
    assert d.scores.tolist() == pytest.approx([0.9, 0.6])


def test_class_aware_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([0, 0, 1, 0])
    assert nms_class_aware(boxes, scores, labels, 0.5).tolist() == [0, 2, 3]
    _, meta = resize_image(np.zeros((100, 100, 3), np.uint8), 100, "stretch")
    outputs = {"scores": scores[None], "labels": labels[None], "boxes": (boxes / 100)[None]}
    assert len(postprocess(outputs, [meta], conf=0.1)[0]) == 4  # off by default
    assert postprocess(outputs, [meta], conf=0.1, nms_iou=0.5)[0].scores.tolist() == pytest.approx([0.9, 0.7, 0.6])


def test_boxes_back_to_original_pixels_batched():
    rng = np.random.default_rng(2)
    images = [np.zeros((1080, 1920, 3), np.uint8), np.zeros((480, 360, 3), np.uint8)]
    metas = [resize_image(im, 640, "letterbox")[1] for im in images]
    outs, origs = zip(*(_outputs(rng, m, k=5) for m in metas))
    batched = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    dets = postprocess(batched, metas, conf=0.0)
    for b, (d, orig, meta) in enumerate(zip(dets, origs, metas)):
        assert d.image_shape == meta.orig_shape
        order = np.argsort(-batched["scores"][b])
        np.testing.assert_allclose(d.boxes, orig[order], atol=1e-2)
        assert len(d.masks) == 5
        for m, o, b in zip(d.masks, d.mask_origins, integer_boxes(d.boxes, meta.orig_shape)):
            assert m.shape == (b[3] - b[1], b[2] - b[0]) and tuple(o) == tuple(b[:2])


def test_only_kept_detections_get_masks_and_empty_result():
    rng = np.random.default_rng(3)
    _, meta = resize_image(np.zeros((64, 64, 3), np.uint8), 64, "stretch")
    outputs, _ = _outputs(rng, meta, k=4)
    outputs["scores"][:] = 0.1
    (d,) = postprocess(outputs, [meta], conf=0.5)
    assert len(d) == 0 and d.masks == [] and d.full_masks().shape == (0, 64, 64)


def test_bad_outputs_are_named():
    _, meta = resize_image(np.zeros((64, 64, 3), np.uint8), 64, "stretch")
    with pytest.raises(KeyError, match="boxes"):
        postprocess({"scores": np.zeros((1, 3)), "labels": np.zeros((1, 3))}, [meta])
    with pytest.raises(ValueError, match="mask_logits"):
        postprocess(
            {"scores": np.zeros((1, 3)), "labels": np.zeros((1, 3)), "boxes": np.zeros((1, 3, 4)), "mask_logits": np.zeros((1, 2, 16, 16))},
            [meta],
        )
    base = {"scores": np.zeros((1, 3)), "labels": np.zeros((1, 3)), "boxes": np.zeros((1, 3, 4))}
    with pytest.raises(ValueError, match="mask_embed"):  # features without embeddings
        postprocess({**base, "mask_features": np.zeros((1, 16, 16, 8))}, [meta])
    with pytest.raises(ValueError, match=r"\[B,K,C\]"):  # embeddings of another width than the features
        postprocess({**base, "mask_features": np.zeros((1, 16, 16, 8)), "mask_embed": np.zeros((1, 3, 4))}, [meta])
    with pytest.raises(ValueError, match="metas"):
        postprocess([np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3, 4))], [meta])


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_factored_mask_outputs_give_exactly_the_masks_of_their_logits(resize):
    """Masks from (pixel features, embeddings) - the product taken only inside each kept box - equal the masks
    cut from the full logit maps (what files of metadata schema 1 output), pixel for pixel."""
    rng = np.random.default_rng(3)
    _, meta = resize_image(np.zeros((300, 500, 3), np.uint8), (256, 320), resize)
    outputs, _ = _outputs(rng, meta, k=10)
    channels = 24
    # A dense embedding instead of one-hot. Small integers (features in 1/8 steps) keep every product and sum
    # exact in float32, so the two summation orders agree on any CPU and BLAS and the comparison can be exact.
    mix = rng.integers(-3, 4, size=(10, channels)).astype(np.float32)
    features = np.round(8 * outputs["mask_features"][0] @ np.linalg.pinv(mix).T) / 8  # logits ~ mix . features
    features = features.astype(np.float32)
    factored = {**outputs, "mask_features": features[None], "mask_embed": mix[None]}
    legacy = {k: v for k, v in outputs.items() if not k.startswith("mask_")}
    legacy["mask_logits"] = np.einsum("kc,hwc->khw", mix, features).astype(np.float32)[None]
    (a,) = postprocess(factored, [meta], conf=0.2)
    (b,) = postprocess(legacy, [meta], conf=0.2)
    assert len(a) >= 3 and a.has_masks
    np.testing.assert_array_equal(a.boxes, b.boxes)
    for ma, mb in zip(a.masks, b.masks, strict=True):
        np.testing.assert_array_equal(ma, mb)
