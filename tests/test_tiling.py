"""Tiled inference (infer/tiling.py): windows, merging of duplicates across window borders, and small
objects on a large image found tiled and missed untiled (the stand-in ONNX model, segment and detect)."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from dfineseg.infer.detections import Detections
from dfineseg.infer.predictor import Predictor
from dfineseg.infer.tiling import merge_duplicates, tile_windows
from dfineseg.infer_cli import run_infer


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(1000, 1500, 640, 0.2), (300, 200, 640, 0.2),
                                                        (700, 700, 256, 0.0), (4320, 7680, 640, 0.25)])
def test_windows_cover_the_image_and_overlap(h, w, tile, overlap):
    windows = tile_windows(h, w, tile, overlap)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == min(tile, w) and y1 - y0 == min(tile, h)
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({x0 for x0, _, _, _ in windows})
    for a, b in zip(xs, xs[1:]):  # neighbours overlap by at least the asked share of a tile
        assert tile - (b - a) >= int(overlap * tile) - 1


def test_bad_tile_options_are_refused():
    with pytest.raises(ValueError, match="tile"):
        tile_windows(100, 100, 8, 0.2)
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(100, 100, 64, 1.0)


def test_a_piece_cut_by_a_window_border_merges_into_the_whole_object():
    shape = (100, 100)
    whole = np.ones((40, 40), bool)
    piece = np.ones((40, 12), bool)  # the object's left 12 columns, as a window ending at x=22 saw it
    det = Detections([[10, 10, 50, 50], [10, 10, 22, 50], [10, 10, 22, 50]], [0.6, 0.9, 0.8], [0, 0, 1], shape,
                     [whole, piece, piece], [[10, 10], [10, 10], [10, 10]])
    kept = merge_duplicates(det)
    # the piece scores higher than the whole: plain IoU (0.3) would keep both; intersection over the
    # smaller area (1.0) merges them; the other class stays
    assert sorted(kept.scores.tolist()) == pytest.approx([0.8, 0.9])
    boxes_only = merge_duplicates(Detections(det.boxes, det.scores, det.labels, shape))
    assert len(boxes_only) == 2


def _large_scene(h=960, w=1440, n=6, side=40, seed=0, tile=160, overlap=0.2):
    """Black image with `n` small saturated red squares, each centred in the first grid cell (of the
    stand-in's 2x3 cells) of some window, so the stand-in sees it there: its score depends on how much of a
    cell an object fills, which the whole-image pass (480 px cells) makes tiny. Returns image and centres."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    windows = tile_windows(h, w, tile, overlap)
    centres: list[tuple[int, int]] = []
    for k in rng.permutation(len(windows)):
        x0, y0, _, _ = windows[k]
        cy, cx = y0 + tile // 4, x0 + tile // 6  # the middle of the window's first cell (80 x 53 px)
        if all(abs(cy - y) > 3 * tile or abs(cx - x) > 3 * tile for y, x in centres):
            img[cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2, 0] = 255
            centres.append((cy, cx))
        if len(centres) == n:
            break
    return img, centres


def _recall(det: Detections, centres) -> float:
    found = sum(any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in det.boxes) for cy, cx in centres)
    return found / len(centres)


@pytest.mark.parametrize("model", ["onnx", "onnx_detect"])
def test_small_objects_are_found_tiled_and_missed_untiled(standin_files, model, capsys):
    predictor = Predictor.load(getattr(standin_files, model), conf=0.5)
    image, centres = _large_scene()
    assert len(centres) >= 4
    t0 = time.perf_counter()
    untiled = predictor.predict(image)
    t1 = time.perf_counter()
    tiled = predictor.predict_tiled(image, tile=160, overlap=0.2)
    t2 = time.perf_counter()
    print(f"{model}: recall untiled {_recall(untiled, centres):.2f} ({1000 * (t1 - t0):.1f} ms), "
          f"tiled {_recall(tiled, centres):.2f} ({1000 * (t2 - t1):.1f} ms)")
    assert _recall(untiled, centres) == 0.0
    assert _recall(tiled, centres) == 1.0
    assert tiled.image_shape == image.shape[:2]
    if tiled.has_masks:  # masks are crops in full-image pixels and cover the squares' pixels
        full = np.zeros(image.shape[:2], bool)
        for m, (x, y) in zip(tiled.masks, tiled.mask_origins):
            full[y:y + m.shape[0], x:x + m.shape[1]] |= m
        red = image[:, :, 0] > 0
        assert (full & red).sum() >= 0.9 * red.sum()
    # one detection per square and window position: duplicates across borders were merged
    per_square = [sum(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in tiled.boxes) for cy, cx in centres]
    assert max(per_square) <= 2, per_square


def test_infer_command_tiles_a_folder(standin_files, tmp_path):
    image, centres = _large_scene(seed=1)
    src = tmp_path / "big"
    src.mkdir()
    cv2.imwrite(str(src / "big.png"), image[:, :, ::-1])
    out = tmp_path / "run"
    assert run_infer([f"model={standin_files.onnx}", f"source={src}", f"out={out}", "tile=160", "overlap=0.2",
                      "progress=false", "conf=0.5"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    boxes = np.array([r["bbox"] for r in results]).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    assert _recall(Detections(boxes, np.ones(len(boxes)), np.zeros(len(boxes)), image.shape[:2]), centres) == 1.0
