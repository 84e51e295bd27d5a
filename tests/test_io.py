"""Sources (image, folder, glob, video, webcam) and sinks (drawn images, video, COCO JSON, YOLO txt, crops)."""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np
import pytest
from test_predictor_standin import (
    CATEGORY_IDS,
    NAMES,
    assert_same_detections,
    scene,
)

from dfineseg.infer.io import (
    ImageReadError,
    ResultWriter,
    SinkOptions,
    SourceError,
    open_source,
    read_image,
)
from dfineseg.infer.predictor import Predictor


def _write_rgb(path, rgb):
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])


def _jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose EXIF says 'rotate for display' (an APP1 block with the Orientation tag)."""
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    data = buf.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


# ------------------------------------------------------------------------------------------ reading
def test_read_image_converts_gray_rgba_16bit(tmp_path):
    rgb = scene(1)
    _write_rgb(tmp_path / "rgb.png", rgb)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 9, np.uint8)]))
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[:, :, ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "gray.png"), rgb[:, :, 0])
    for name in ("rgb.png", "rgba.png", "deep.png"):
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == rgb.shape
        np.testing.assert_array_equal(got, rgb)
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == rgb.shape and (gray[:, :, 0] == rgb[:, :, 0]).all() and (gray[:, :, 2] == rgb[:, :, 0]).all()


def test_read_image_applies_exif_orientation(tmp_path):
    rgb = scene(2)
    (tmp_path / "rot.jpg").write_bytes(_jpeg_with_orientation(rgb, 6))  # 6: rotate 90 degrees clockwise
    got = read_image(tmp_path / "rot.jpg")
    stored = cv2.imread(str(tmp_path / "rot.jpg"), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[:, :, ::-1]
    assert stored.shape == rgb.shape and got.shape == (rgb.shape[1], rgb.shape[0], 3)
    np.testing.assert_array_equal(got, np.rot90(stored, k=-1))


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("empty.png", "text.jpg", "absent.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)



def test_full_probe_names_a_jpeg_whose_scan_data_is_corrupt(tmp_path, capfd):
    from dfineseg.infer.image_io import probe_image

    ok, buf = cv2.imencode(".jpg", scene(3)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    data = buf.tobytes()
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    n = (len(data) - 2 - start) // 5
    mid = (start + len(data) - 2) // 2
    path = tmp_path / "garbled.jpg"
    path.write_bytes(data[:mid] + b"\xaa" * n + data[mid + n :])
    assert probe_image(path).width == scene(3).shape[1]  # the header check alone cannot see it
    with pytest.raises(ImageReadError, match=r"garbled\.jpg: corrupt JPEG data \(libjpeg: Corrupt JPEG data"):
        probe_image(path, decode=True)
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # captured and turned into the error, not printed
    (tmp_path / "fine.jpg").write_bytes(data)
    assert probe_image(tmp_path / "fine.jpg", decode=True).width == scene(3).shape[1]


# ------------------------------------------------------------------------------------------ sources
def test_folder_source_sorted_recursive_with_counted_skips(tmp_path):
    (tmp_path / "sub").mkdir()
    _write_rgb(tmp_path / "b.png", scene(0))
    _write_rgb(tmp_path / "a.jpg", scene(1))
    _write_rgb(tmp_path / "sub" / "c.png", scene(2))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(tmp_path)
    assert src.kind == "folder" and src.total == 4
    frames = list(src)
    assert [f.name for f in frames] == ["a.jpg", "b.png", "sub/c.png"]
    assert [f.image_id for f in frames] == [1, 2, 4]  # ids follow the sorted file names, skipped ones too
    assert len(src.skipped) == 1 and src.skipped[0][0].endswith("broken.png")
    assert "IHDR" in src.skipped[0][1]  # the shared reader says what is wrong with the file
    np.testing.assert_array_equal(frames[1].image, scene(0))


def test_single_image_glob_and_missing_sources(tmp_path):
    _write_rgb(tmp_path / "x1.png", scene(3))
    _write_rgb(tmp_path / "x2.png", scene(4))
    _write_rgb(tmp_path / "y.png", scene(5))
    single = open_source(tmp_path / "y.png")
    assert single.kind == "image" and [f.name for f in single] == ["y.png"]
    globbed = open_source(str(tmp_path / "x*.png"))
    assert globbed.kind == "glob" and [f.name for f in globbed] == ["x1.png", "x2.png"]
    with pytest.raises(SourceError, match="source not found"):
        open_source(tmp_path / "nothing_here")
    with pytest.raises(SourceError, match="matches no image"):
        open_source(str(tmp_path / "*.tif"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ImageReadError, match="bad.png"):
        list(open_source(tmp_path / "bad.png"))  # one image asked for: an error, not a skip


def _write_video(path, frames, fps=10):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f[:, :, ::-1])
    writer.release()


def test_video_source_and_webcam_errors(tmp_path):
    frames = [scene(i) for i in range(5)]
    _write_video(tmp_path / "clip.mp4", frames, fps=12)
    src = open_source(tmp_path / "clip.mp4")
    assert src.kind == "video" and src.total == 5 and src.fps == pytest.approx(12) and src.size == (160, 120)
    got = list(src)
    assert [f.frame_index for f in got] == [1, 2, 3, 4, 5] and got[0].name == "clip_000001"
    assert got[0].image.shape == (120, 160, 3)
    assert len(list(open_source(tmp_path / "clip.mp4", max_frames=2))) == 2
    try:
        open_source("7")
    except SourceError as exc:
        assert "webcam 7" in str(exc)
    else:  # pragma: no cover - a machine with 8 cameras
        pytest.skip("a webcam 7 exists here")


# ------------------------------------------------------------------------------------------ sinks
@pytest.fixture(scope="module")
def predictor(standin_files):
    return Predictor.load(standin_files.onnx)


def _gt_from(dets, image_ids, shapes):
    """Ground truth near the predictions (shifted boxes, one object dropped): a non-trivial mAP."""
    images, anns = [], []
    for image_id, det, (h, w) in zip(image_ids, dets, shapes):
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.png"})
        for i in range(len(det) - (1 if image_id % 2 else 0)):
            x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
            x1, y1, x2 = x1 + 2, y1 + 1, x2 - 1
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[int(det.labels[i])],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0,
                         # the box as a polygon: overlaps the predicted mask, but not exactly
                         "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    cats = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, NAMES)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_predictions_json_rescored_equals_in_memory_metric(predictor, tmp_path):
    from faster_coco_eval import COCO, COCOeval_faster

    from dfineseg.infer.metrics import coco_map

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        _write_rgb(folder / f"img{i}.png", scene(10 + i))
    src = open_source(folder)
    writer = ResultWriter(tmp_path / "out", predictor.names, predictor.category_ids, SinkOptions(save_images=False))
    dets, ids, shapes = [], [], []
    for frame in src:
        det = predictor.predict(frame.image)
        writer.write(frame, det)
        dets.append(det)
        ids.append(frame.image_id)
        shapes.append(frame.image.shape[:2])
    summary = writer.close()
    assert summary["images"] == 5 and summary["detections"] == sum(len(d) for d in dets) > 0
    gt = _gt_from(dets, ids, shapes)
    in_memory = [e for det, i in zip(dets, ids) for e in det.to_coco(i, CATEGORY_IDS)]
    images_map = json.loads((tmp_path / "out" / "images.json").read_text())
    assert images_map == {str(i): str(folder / f"img{i - 1}.png") for i in ids}
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {e["category_id"] for e in written} <= set(CATEGORY_IDS)
    for iou_type in ("bbox", "segm"):
        expected = coco_map(gt, in_memory, iou_type)
        assert 0.05 < expected["map50_95"] < 1.0
        coco_gt = COCO(gt)
        ev = COCOeval_faster(coco_gt, coco_gt.loadRes(str(tmp_path / "out" / "predictions.json")), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(expected["map50_95"], abs=1e-9)
        assert ev.stats[1] == pytest.approx(expected["map50"], abs=1e-9)


def test_yolo_txt_crops_and_drawn_images(predictor, tmp_path):
    img = scene(21)
    _write_rgb(tmp_path / "in.png", img)
    frame = next(iter(open_source(tmp_path / "in.png")))
    det = predictor.predict(frame.image)
    assert len(det) >= 2
    writer = ResultWriter(tmp_path / "out", NAMES, CATEGORY_IDS, SinkOptions(save_txt=True, save_crops=True, mask_alpha=0.5))
    writer.write(frame, det)
    writer.close()
    # YOLO-seg txt: one line per detection; its polygon re-rasterised covers the predicted mask
    lines = (tmp_path / "out" / "labels" / "in.txt").read_text().splitlines()
    assert len(lines) == len(det)
    full = det.full_masks()
    h, w = img.shape[:2]
    for line, label, mask in zip(lines, det.labels, full):
        parts = line.split()
        assert int(parts[0]) == int(label)
        poly = (np.array(parts[1:], float).reshape(-1, 2) * [w, h]).round().astype(np.int32)
        raster = np.zeros((h, w), np.uint8)
        cv2.fillPoly(raster, [poly], 1)
        inter, union = (raster.astype(bool) & mask).sum(), (raster.astype(bool) | mask).sum()
        assert inter / union > 0.8
    crops = sorted((tmp_path / "out" / "crops").rglob("*.jpg"))
    assert len(crops) == len(det)
    assert {c.parent.name for c in crops} == {NAMES[int(k)] for k in det.labels}
    x1, y1, x2, y2 = np.floor(det.boxes[0]).astype(int)
    first = cv2.imread(str(tmp_path / "out" / "crops" / NAMES[int(det.labels[0])] / "in_0.jpg"))
    assert abs(first.shape[0] - (np.ceil(det.boxes[0][3]) - y1)) <= 1
    # drawn image: masked pixels are tinted, pixels far from every box are unchanged
    drawn = cv2.imread(str(tmp_path / "out" / "images" / "in.png"))[:, :, ::-1]
    assert drawn.shape == img.shape
    any_mask = full.any(0)
    assert (drawn[any_mask] != img[any_mask]).any(axis=-1).mean() > 0.5
    far = np.ones((h, w), bool)
    for bx1, by1, bx2, by2 in det.boxes.astype(int):
        far[max(by1 - 30, 0) : by2 + 30, max(bx1 - 30, 0) : bx2 + 30] = False
    if far.any():
        np.testing.assert_array_equal(drawn[far], img[far])
    assert (tmp_path / "out" / "predictions.json").is_file()


def test_draw_does_not_modify_the_input_and_handles_empty(predictor):
    from dfineseg.infer.detections import Detections
    from dfineseg.infer.draw import draw_detections

    img = scene(22)
    before = img.copy()
    det = predictor.predict(img)
    drawn = draw_detections(img, det, NAMES)
    np.testing.assert_array_equal(img, before)
    assert (drawn != img).any()
    np.testing.assert_array_equal(draw_detections(img, Detections.empty(img.shape[:2], True), NAMES), img)


def test_video_sink_writes_every_frame(predictor, tmp_path):
    frames = [scene(i) for i in range(4)]
    _write_video(tmp_path / "clip.mp4", frames)
    src = open_source(tmp_path / "clip.mp4")
    writer = ResultWriter(tmp_path / "out", NAMES, CATEGORY_IDS, SinkOptions(), video_fps=src.fps)
    decoded = []
    for key, image, det in predictor.stream((f, f.image) for f in src):
        decoded.append(image)
        writer.write(key, det)
    summary = writer.close()
    out = cv2.VideoCapture(summary["video"])
    n = 0
    while out.read()[0]:
        n += 1
    assert n == 4 and int(out.get(cv2.CAP_PROP_FRAME_WIDTH)) == 160
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {r["image_id"] for r in results} <= {1, 2, 3, 4}
    # streamed detections equal per-frame prediction
    for image_id, image in enumerate(decoded, 1):
        det = predictor.predict(image)
        mine = [r for r in results if r["image_id"] == image_id]
        assert len(mine) == len(det)
    assert_same_detections(predictor.predict(decoded[0]), predictor.predict(decoded[0]))
