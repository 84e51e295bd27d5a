"""YOLO data.yaml parsing, format detection and image reading (gray, alpha, 16-bit, EXIF)."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfineseg.data import DatasetError, detect_format, load_index, probe_image, read_image
from dfineseg.data.yolo import label_path_for, read_data_yaml


def write_jpeg(path: Path, h: int = 60, w: int = 80, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    cv2.imwrite(str(path), img)
    return path


def exif_jpeg_bytes(img_bgr: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose EXIF orientation tag says `orientation` (written by hand: no PIL needed)."""
    data = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01" + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def make_yolo(root: Path, names="[a, b, c]", extra: str = "") -> Path:
    write_jpeg(root / "images" / "train" / "b.jpg", 60, 80)
    write_jpeg(root / "images" / "train" / "a.jpg", 50, 100)
    write_jpeg(root / "images" / "train" / "sub" / "0.jpg", 40, 40)
    write_jpeg(root / "images" / "val" / "v.jpg", 40, 40)
    lbl = root / "labels" / "train"
    lbl.mkdir(parents=True)
    # a.jpg: one box (no mask) and one polygon, mixed in one file.
    (lbl / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.1 0.1 0.5 0.1 0.5 0.6\n")
    (lbl / "b.txt").write_text("1 0.25 0.25 0.5 0.5\n")
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "v.txt").write_text("1 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9\n")
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n{extra}")
    return yaml_path


def test_parse_boxes_and_polygons_in_pixels(tmp_path):
    data = make_yolo(tmp_path)
    idx = load_index(data, "train")
    assert idx.format == "yolo" and idx.names == ["a", "b", "c"] and idx.category_ids == [0, 1, 2]
    # ids follow the sorted relative paths: a.jpg, b.jpg, sub/0.jpg
    assert [(r.image_id, r.file.name) for r in idx.images] == [(1, "a.jpg"), (2, "b.jpg"), (3, "0.jpg")]
    a = idx.images[0]
    assert (a.width, a.height) == (100, 50)
    box, poly = a.instances
    assert box.label == 0 and not box.has_mask and box.polygons is None
    np.testing.assert_allclose(box.box_xyxy, [40, 15, 60, 35], atol=1e-4)
    assert poly.label == 2 and poly.has_mask
    np.testing.assert_allclose(poly.polygons[0], [[10, 5], [50, 5], [50, 30]], atol=1e-4)
    np.testing.assert_allclose(poly.box_xyxy, [10, 5, 50, 30], atol=1e-4)
    # sub/0.jpg has no label file: kept as background and said so
    assert idx.images[2].instances == []
    assert any("no label file" in p.reason and p.file.endswith("0.jpg") for p in idx.problems)
    assert load_index(tmp_path, "val").images[0].instances[0].has_mask  # the folder works too


def test_names_dict_txt_lists_and_path_key(tmp_path):
    root = tmp_path / "ds"
    make_yolo(root, names="{0: a, 1: b, 2: c}")
    (root / "train.txt").write_text("./images/train/b.jpg\nimages/train/a.jpg\n\nimages/train/missing.jpg\n")
    yaml_path = tmp_path / "custom.yaml"
    yaml_path.write_text("path: ds\ntrain: train.txt\nval: [images/val]\nnames: {0: a, 1: b, 2: c}\n")
    idx = load_index(yaml_path, "train")
    assert idx.names == ["a", "b", "c"]
    assert [r.file.name for r in idx.images] == ["a.jpg", "b.jpg"]
    missing = [p for p in idx.problems if "missing.jpg" in p.reason]
    assert missing and missing[0].line == 4 and missing[0].file.endswith("train.txt")
    assert len(load_index(yaml_path, "val").images) == 1


def test_label_path_substitution():
    assert label_path_for(Path("/d/images/train/x.jpg")) == Path("/d/labels/train/x.txt")
    # the last images/ is replaced (Ultralytics' rule)
    assert label_path_for(Path("/images/d/images/x.png")) == Path("/images/d/labels/x.txt")
    assert label_path_for(Path("/d/pics/x.jpg")) == Path("/d/pics/x.txt")


def test_clear_errors_for_bad_yaml_and_layout(tmp_path):
    data = make_yolo(tmp_path)
    with pytest.raises(DatasetError, match="no `test:` entry"):
        load_index(data, "test")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: images/train\nval: images/nowhere\nnames: [a]\n")
    with pytest.raises(DatasetError, match="images/nowhere"):
        load_index(bad, "val")
    no_names = tmp_path / "nonames.yaml"
    no_names.write_text("train: images/train\n")
    with pytest.raises(DatasetError, match="names"):
        read_data_yaml(no_names)
    gaps = tmp_path / "gaps.yaml"
    gaps.write_text("train: images/train\nnames: {0: a, 2: b}\n")
    with pytest.raises(DatasetError, match="without gaps"):
        read_data_yaml(gaps)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [images\nnames: [a]\n")
    with pytest.raises(DatasetError, match="not valid YAML"):
        read_data_yaml(broken)


def test_detect_format_says_what_was_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="data.yaml.*COCO"):
        detect_format(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        detect_format(tmp_path / "nope")
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(DatasetError, match="not a dataset description"):
        detect_format(txt)
    assert detect_format(make_yolo(tmp_path / "y"))[0] == "yolo"
    assert detect_format(tmp_path / "y")[0] == "yolo"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_opencv(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    img = (rng.random((24, 40, 3)) * 255).astype(np.uint8)
    img[:6, :10] = (0, 0, 255)  # a marker corner makes every flip/rotation distinguishable
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(exif_jpeg_bytes(img, orientation))
    ours = read_image(path)
    opencv = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]  # OpenCV applies EXIF itself here
    np.testing.assert_array_equal(ours, opencv)
    info = probe_image(path)
    assert (info.height, info.width) == ours.shape[:2]
    assert (info.width, info.height) == ((24, 40) if orientation >= 5 else (40, 24))


def test_gray_rgba_and_16bit_are_converted(tmp_path):
    gray = tmp_path / "g.png"
    cv2.imwrite(str(gray), np.full((20, 30), 200, np.uint8))
    rgba = tmp_path / "a.png"
    bgra = np.zeros((20, 30, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 255, 128  # blue, half transparent
    cv2.imwrite(str(rgba), bgra)
    deep = tmp_path / "d.png"
    cv2.imwrite(str(deep), np.full((20, 30, 3), 65535, np.uint16))
    for path, expect, note in ((gray, (200, 200, 200), "grayscale"), (rgba, (0, 0, 255), "alpha"), (deep, (255, 255, 255), "16-bit")):
        img = read_image(path)
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8
        assert tuple(img[5, 5]) == expect
        assert any(note in c for c in probe_image(path).conversions)


def test_parsing_checks_transforms_and_synthesis_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, dfineseg.data, dfineseg.data.checks, dfineseg.data.synthetic, dfineseg.data.transforms;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_images_sharing_one_label_file_are_skipped_and_named(tmp_path):
    data = make_yolo(tmp_path)
    img_dir = tmp_path / "images" / "train"
    cv2.imwrite(str(img_dir / "a.png"), np.full((50, 100, 3), 60, np.uint8))  # a.jpg and a.png -> labels/a.txt
    idx = load_index(data, "train")
    assert [r.file.name for r in idx.images] == ["b.jpg", "0.jpg"]
    label = tmp_path / "labels" / "train" / "a.txt"
    for name, other in (("a.jpg", "a.png"), ("a.png", "a.jpg")):
        hits = [p for p in idx.problems if p.file == str(img_dir / name)]
        assert len(hits) == 1 and hits[0].severity == "error"
        assert str(label) in hits[0].reason and str(img_dir / other) in hits[0].reason
        assert "skipped" in hits[0].action and "rename" in hits[0].action


def test_dangling_symlink_is_reported_not_ignored(tmp_path):
    data = make_yolo(tmp_path)
    link = tmp_path / "images" / "train" / "gone.jpg"
    link.symlink_to(tmp_path / "elsewhere" / "gone.jpg")
    idx = load_index(data, "train")
    hits = [p for p in idx.problems if p.file == str(link)]
    assert len(hits) == 1 and hits[0].severity == "error" and hits[0].action == "image skipped"
    assert "broken symlink" in hits[0].reason and str(tmp_path / "elsewhere" / "gone.jpg") in hits[0].reason
    assert len(idx.images) == 3
    # listed in a .txt image list: the list's line names it
    (tmp_path / "train.txt").write_text("images/train/a.jpg\nimages/train/gone.jpg\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("train: train.txt\nnames: [a, b, c]\n")
    hits = [p for p in load_index(listed, "train").problems if "gone.jpg" in p.reason]
    assert len(hits) == 1 and hits[0].line == 2 and "broken symlink" in hits[0].reason
