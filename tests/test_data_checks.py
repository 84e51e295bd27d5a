"""`data check` on a dataset with every planted fault: each is reported with file, line and reason, the
right thing is done (skip image / skip line / keep as background / convert), and no file changes."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfineseg.data import load_index
from dfineseg.data.checks import run_check
from dfineseg.data.index import ERROR, INFO, WARNING

GOOD_LINES = [
    "0 0.5 0.5 0.4 0.4",  # 1 box
    "1 0.1 0.1 0.6 0.1 0.6 0.7",  # 2 polygon
    "7 0.5 0.5 0.2 0.2",  # 3 class out of range
    "0 0.5 0.5 1.6 0.2",  # 4 outside [0,1] by far
    "1 -0.005 0.2 0.5 0.2 0.5 1.004",  # 5 slightly outside: clipped, kept
    "1 0.3 0.3",  # 6 polygon with 1 point
    "0 nan 0.5 0.2 0.2",  # 7 NaN
    "0 0.5 inf 0.2 0.2",  # 8 Inf
    "0 0.5 0.5 0.4 0.4",  # 9 duplicate of line 1
    "1 0.2 0.2 0.2 0.2 0.4 0.4",  # 10 polygon with 2 distinct points
]


def _jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img)[1].tobytes()


def _exif_jpeg(img: np.ndarray, orientation: int) -> bytes:
    data = _jpeg(img)
    tiff = b"II\x2a\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def build_faulty(root: Path) -> dict[str, Path]:
    imgs, lbls = root / "images" / "train", root / "labels" / "train"
    imgs.mkdir(parents=True)
    lbls.mkdir(parents=True)
    (root / "images" / "val").mkdir(parents=True)
    base = np.full((64, 96, 3), 120, np.uint8)
    f = {}
    f["good"] = imgs / "good.jpg"
    f["good"].write_bytes(_jpeg(base))
    (lbls / "good.txt").write_text("\n".join(GOOD_LINES) + "\n")
    full = _jpeg(base)
    f["truncated"] = imgs / "truncated.jpg"
    f["truncated"].write_bytes(full[: len(full) // 2])
    f["garbage"] = imgs / "garbage.jpg"
    f["garbage"].write_bytes(b"this is not an image at all" * 10)
    f["tiny"] = imgs / "tiny.jpg"
    f["tiny"].write_bytes(_jpeg(np.zeros((10, 40, 3), np.uint8)))
    f["nolabel"] = imgs / "nolabel.jpg"
    f["nolabel"].write_bytes(_jpeg(base))
    f["empty"] = imgs / "empty.jpg"
    f["empty"].write_bytes(_jpeg(base))
    (lbls / "empty.txt").write_text("")
    f["gray"] = imgs / "gray.png"
    cv2.imwrite(str(f["gray"]), np.full((64, 96), 50, np.uint8))
    f["rgba"] = imgs / "rgba.png"
    cv2.imwrite(str(f["rgba"]), np.full((64, 96, 4), 200, np.uint8))
    f["deep"] = imgs / "deep.png"
    cv2.imwrite(str(f["deep"]), np.full((64, 96, 3), 40000, np.uint16))
    f["exif"] = imgs / "exif.jpg"
    f["exif"].write_bytes(_exif_jpeg(base, 6))  # stored 96x64, displayed 64x96
    for name in ("gray", "rgba", "deep", "exif"):
        (lbls / f"{name}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [box, poly]\n")
    return f


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def faulty(tmp_path):
    root = tmp_path / "faulty"
    return root, build_faulty(root)


def test_every_planted_fault_is_reported_and_nothing_changes(faulty):
    root, f = faulty
    before = _hashes(root)
    out = io.StringIO()
    report = run_check(str(root / "data.yaml"), stream=out)
    assert _hashes(root) == before  # no file changed, none added (no cache in the dataset)
    text = out.getvalue()
    assert report.fatal is None and not report.ok
    problems = report.problems

    def find(file: Path | str, line=None, contains="", severity=None):
        hits = [p for p in problems if p.file == str(file) and p.line == line and contains in p.reason
                and (severity is None or p.severity == severity)]
        assert hits, f"no problem for {file}:{line} containing {contains!r}; got:\n{text}"
        return hits[0]

    lbl = root / "labels" / "train" / "good.txt"
    find(lbl, 3, "class id 7 out of range", WARNING)
    find(lbl, 4, "outside [0,1]", WARNING)
    assert find(lbl, 5, "slightly outside", INFO).action == "clipped"
    find(lbl, 6, "fewer than 3 points", WARNING)
    find(lbl, 7, "NaN", WARNING)
    find(lbl, 8, "Inf", WARNING)
    assert find(lbl, 9, "duplicate", INFO).action == "deduplicated"
    find(lbl, 10, "fewer than 3 distinct points", WARNING)
    for line in (1, 2):
        assert not [p for p in problems if p.file == str(lbl) and p.line == line]
    for key, reason in (("truncated", "truncated"), ("garbage", "not a readable image"), ("tiny", "smaller than 16 px")):
        assert find(f[key], None, reason, ERROR).action == "image skipped"
    assert find(f["nolabel"], None, "no label file", INFO).action == "background image, kept"
    assert find(root / "labels" / "train" / "empty.txt", None, "empty label file", INFO).action == "background image, kept"
    find(f["gray"], None, "grayscale", INFO)
    find(f["rgba"], None, "alpha", INFO)
    find(f["deep"], None, "16-bit", INFO)
    find(f["exif"], None, "EXIF orientation 6", INFO)
    # the printed report names file:line and reason for line problems, and counts per class and split
    assert f"{lbl}:3: class id 7 out of range" in text
    assert f"{f['truncated']}: truncated JPEG" in text
    split = report.splits["train"]
    assert split.images == 7 and split.skipped == 3 and split.background == 2
    assert any("no images" in p.reason for p in report.splits["val"].problems)
    # good.jpg keeps lines 1, 2, 5; the four converted images have one box each
    assert split.instances_per_class == [1 + 4, 2]
    assert "box" in text and "poly" in text


def test_training_loads_the_same_way(faulty):
    root, f = faulty
    before = _hashes(root)
    idx = load_index(root / "data.yaml", "train")  # header-only probing: same decisions, no decode
    assert _hashes(root) == before
    kept = {r.file.name: r for r in idx.images}
    assert set(kept) == {"good.jpg", "nolabel.jpg", "empty.jpg", "gray.png", "rgba.png", "deep.png", "exif.jpg"}
    assert (kept["exif.jpg"].width, kept["exif.jpg"].height) == (64, 96)  # EXIF-applied size
    # the box on the rotated image is in displayed coordinates
    np.testing.assert_allclose(kept["exif.jpg"].instances[0].box_xyxy, [16, 24, 48, 72])
    assert "images skipped" in idx.summary()
    from dfineseg.data.dataset import SegmentationDataset

    ds = SegmentationDataset(idx, 64, train=False)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64)
    # an image that breaks after indexing is replaced at training time, counted, not a crash
    f["gray"].write_bytes(b"broken now")
    ds = SegmentationDataset(idx, 64, train=True)
    order = [r.file.name for r in idx.images]
    image, target = ds[order.index("gray.png")]
    assert image.shape == (3, 64, 64) and str(f["gray"]) in ds.failed


def test_check_reports_structural_errors_without_crashing(tmp_path):
    out = io.StringIO()
    report = run_check(str(tmp_path / "missing.yaml"), stream=out)
    assert report.fatal and "does not exist" in out.getvalue()
    (tmp_path / "d.yaml").write_text("train: images/train\nval: nowhere\nnames: [a]\n")
    (tmp_path / "images" / "train").mkdir(parents=True)
    out = io.StringIO()
    report = run_check(str(tmp_path / "d.yaml"), stream=out)
    assert report.fatal and "nowhere" in report.fatal and "train" in report.splits


def test_cli_data_check(faulty, capsys):
    from dfineseg.cli import main

    root, _ = faulty
    assert main(["data", "check", f"data={root / 'data.yaml'}"]) == 0
    assert "class id 7 out of range" in capsys.readouterr().out


def _textured_jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((96, 128, 3)) * 255).astype(np.uint8), (7, 7), 3)
    return _jpeg(img)


def _scan_data(data: bytes) -> tuple[int, int]:
    """[start, end) of the entropy-coded data of a baseline JPEG (after the SOS header, before EOI)."""
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    assert data.endswith(b"\xff\xd9")
    return sos + 2 + length, len(data) - 2


def test_check_decodes_fully_and_names_jpegs_with_corrupt_scan_data(tmp_path):
    """cv2.imdecode 'repairs' these (grey blocks) and libjpeg only prints an anonymous warning on stderr."""
    root = tmp_path / "ds"
    imgs, lbls = root / "images" / "train", root / "labels" / "train"
    imgs.mkdir(parents=True)
    lbls.mkdir(parents=True)
    good = _textured_jpeg()
    start, end = _scan_data(good)
    n = (end - start) // 5
    mid = start + (end - start) // 2 - n // 2
    garbled = good[:mid] + b"\xaa" * n + good[mid + n :]  # entropy data overwritten in the middle
    cut = good[: int(len(good) * 0.6)]
    files = {
        "good.jpg": good,
        "garbled.jpg": garbled,
        "cut_eoi.jpg": cut + b"\xff\xd9",  # truncated to 60%, end marker put back: the tail check passes
        "cut.jpg": cut,  # plainly truncated to 60%
    }
    for name, data in files.items():
        (imgs / name).write_bytes(data)
        (lbls / f"{Path(name).stem}.txt").write_text("0 0.1 0.1 0.6 0.1 0.6 0.7\n")
    (root / "data.yaml").write_text("train: images/train\nnames: [a]\n")
    for name in ("garbled.jpg", "cut_eoi.jpg"):  # the trap: OpenCV returns pixels for both
        assert cv2.imdecode(np.frombuffer(files[name], np.uint8), cv2.IMREAD_COLOR) is not None
    before = _hashes(root)
    out = io.StringIO()
    report = run_check(str(root / "data.yaml"), stream=out)
    assert _hashes(root) == before
    split = report.splits["train"]
    assert split.images == 1 and split.skipped == 3
    text = out.getvalue()
    for name in ("garbled.jpg", "cut_eoi.jpg"):
        hits = [p for p in report.problems if p.file == str(imgs / name)]
        assert len(hits) == 1 and hits[0].severity == ERROR and hits[0].action == "image skipped"
        assert "corrupt JPEG data" in hits[0].reason
        assert f"{imgs / name}: corrupt JPEG data" in text
    assert any(p.file == str(imgs / "cut.jpg") and "truncated" in p.reason for p in report.problems)


def test_box_only_instances_are_located_in_the_report(tmp_path):
    root = tmp_path / "ds"
    imgs, lbls = root / "images" / "train", root / "labels" / "train"
    imgs.mkdir(parents=True)
    lbls.mkdir(parents=True)
    base = _jpeg(np.full((64, 96, 3), 120, np.uint8))
    for i in range(3):
        (imgs / f"{i}.jpg").write_bytes(base)
        boxes = [f"0 {0.1 + 0.02 * k:.2f} 0.5 0.1 0.1" for k in range(10)]  # lines 2..11 are boxes
        (lbls / f"{i}.txt").write_text("\n".join(["0 0.1 0.1 0.6 0.1 0.6 0.7", *boxes]) + "\n")
    (root / "data.yaml").write_text("train: images/train\nnames: [a]\n")
    out = io.StringIO()
    report = run_check(str(root / "data.yaml"), stream=out)
    split = report.splits["train"]
    assert split.box_only == 30 and report.ok  # valid data, not a problem
    where = [(p.file, p.line, p.severity) for p in split.box_only_examples]
    expected = [(str(lbls / f"{i}.txt"), n, INFO) for i in range(3) for n in range(2, 12)][:20]
    assert where == expected
    text = out.getvalue()
    assert "train: 30 box-only instances" in text and "... 10 more" in text
    assert f"[info] {lbls / '0.txt'}:2: box without a polygon" in text
    assert f"{lbls / '2.txt'}:2:" not in text  # the 21st onwards are counted, not listed
    # COCO: located by annotation id in the json
    from test_data_coco import make_coco

    make_coco(tmp_path / "coco")
    out = io.StringIO()
    report = run_check(str(tmp_path / "coco"), stream=out)
    [example] = report.splits["val"].box_only_examples
    assert example.file.endswith("instances_val.json") and "annotation 4 (image id 7)" in example.reason
    assert "val: 1 box-only instances" in out.getvalue()


def test_cli_data_check_prints_the_new_problems(faulty, capsys):
    from dfineseg.cli import main

    root, f = faulty
    cv2.imwrite(str(root / "images" / "train" / "good.png"), np.full((64, 96, 3), 9, np.uint8))  # shares good.txt
    (root / "images" / "train" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    assert main(["data", "check", f"data={root / 'data.yaml'}"]) == 0
    text = capsys.readouterr().out
    assert f"{f['good']}: shares the label file {root / 'labels' / 'train' / 'good.txt'}" in text
    assert f"{root / 'images' / 'train' / 'gone.jpg'}: broken symlink" in text
    assert f"[info] {root / 'labels' / 'train' / 'good.txt'}:1: box without a polygon" not in text  # good.* skipped
    assert "box-only instances" in text  # the four converted images' boxes
