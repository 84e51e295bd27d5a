"""COCO json parsing: polygons, compressed and uncompressed RLE, crowd, id mapping, layout detection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dfineseg.data import DatasetError, dataset_splits, load_index
from dfineseg.data.dataset import SegmentationDataset

H, W = 40, 60


def _rle_square(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    return m, mask_utils.encode(m)


def make_coco(root: Path, split: str = "val") -> tuple[Path, dict]:
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True)
    for name in ("x.jpg", "y.jpg"):
        cv2.imwrite(str(img_dir / name), np.full((H, W, 3), 90, np.uint8))
    hole, rle = _rle_square(10, 10, 30, 30)
    # an uncompressed (list) RLE for a crowd region: column-major run lengths
    crowd_mask = np.zeros((H, W), np.uint8, order="F")
    crowd_mask[0:5, 40:50] = 1
    flat = crowd_mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    doc = {
        "images": [
            {"id": 42, "file_name": "x.jpg", "width": W, "height": H},
            {"id": 7, "file_name": "y.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 12, "iscrowd": 0, "bbox": [5, 5, 20, 10],
             "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},
            {"id": 2, "image_id": 42, "category_id": 3, "iscrowd": 0, "bbox": [10, 10, 20, 20],
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 42, "category_id": 7, "iscrowd": 1, "bbox": [40, 0, 10, 5],
             "segmentation": {"size": [H, W], "counts": counts}},
            {"id": 4, "image_id": 7, "category_id": 7, "iscrowd": 0, "bbox": [1, 2, 10, 12]},  # box only
            {"id": 5, "image_id": 7, "category_id": 99, "iscrowd": 0, "bbox": [1, 2, 10, 12]},
            {"id": 6, "image_id": 7, "category_id": 3, "iscrowd": 0, "bbox": [1, 2, 3, 4], "segmentation": [[1, 2, 3, 4]]},
            {"id": 7, "image_id": 7, "category_id": 3, "iscrowd": 0, "bbox": [float("nan"), 2, 3, 4]},
        ],
    }
    (root / "annotations").mkdir()
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path, {"hole": hole, "crowd": crowd_mask}


def test_coco_polygons_rle_crowd_and_id_mapping(tmp_path):
    path, masks = make_coco(tmp_path)
    idx = load_index(tmp_path, "val")
    assert idx.format == "coco"
    # categories sorted by id -> contiguous labels; category_ids maps back (round trip)
    assert idx.category_ids == [3, 7, 12] and idx.names == ["three", "seven", "twelve"]
    assert [r.image_id for r in idx.images] == [7, 42]  # ids kept
    rec42 = next(r for r in idx.images if r.image_id == 42)
    by_cat = {idx.category_ids[i.label]: i for i in rec42.instances}
    assert set(by_cat) == {12, 3, 7}
    poly = by_cat[12]
    assert poly.has_mask and poly.polygons is not None
    np.testing.assert_allclose(poly.box_xyxy, [5, 5, 25, 15])
    rle = by_cat[3]
    assert rle.has_mask and rle.rle is not None and not rle.iscrowd
    np.testing.assert_array_equal(mask_utils.decode(rle.rle), masks["hole"])
    crowd = by_cat[7]
    assert crowd.iscrowd
    np.testing.assert_array_equal(mask_utils.decode(crowd.rle), masks["crowd"])
    rec7 = next(r for r in idx.images if r.image_id == 7)
    assert len(rec7.instances) == 1 and not rec7.instances[0].has_mask
    reasons = " | ".join(p.reason for p in idx.problems)
    assert "annotation 5: unknown category_id 99" in reasons
    assert "annotation 6: polygon with fewer than 3 points" in reasons
    assert "annotation 7:" in reasons


def test_dataset_excludes_crowd_and_rasterises_rle(tmp_path):
    make_coco(tmp_path)
    idx = load_index(tmp_path, "val")
    ds = SegmentationDataset(idx, 64, train=False, resize_mode="stretch")
    order = [r.image_id for r in idx.images]
    image, target = ds[order.index(42)]
    labels = [idx.category_ids[i] for i in target["labels"].tolist()]
    assert sorted(labels) == [3, 12]  # the crowd region (category 7) is not a target
    assert target["has_mask"].all() and target["image_id"] == 42 and target["orig_size"] == (H, W)
    rle_mask = target["masks"][labels.index(3)].numpy()
    expected = cv2.resize(masks_hole(), (64, 64), interpolation=cv2.INTER_NEAREST).astype(bool)
    inter = (rle_mask & expected).sum()
    assert inter / (rle_mask | expected).sum() > 0.85


def masks_hole() -> np.ndarray:
    return _rle_square(10, 10, 30, 30)[0]


def test_json_path_and_split_siblings(tmp_path):
    val_json, _ = make_coco(tmp_path, "val")
    train_json = val_json.with_name("instances_train.json")
    train_json.write_text(val_json.read_text())
    (tmp_path / "images" / "train").mkdir()
    for f in (tmp_path / "images" / "val").iterdir():
        (tmp_path / "images" / "train" / f.name).write_bytes(f.read_bytes())
    assert sorted(dataset_splits(tmp_path)) == ["train", "val"]
    idx = load_index(train_json, "val")  # data= a json: the split's sibling file is used
    assert idx.source.endswith("instances_val.json") and len(idx.images) == 2
    single = tmp_path / "annotations" / "mine.json"
    single.write_text(val_json.read_text())
    idx = load_index(single, "val")
    assert any("no separate 'val' annotation file" in p.reason for p in idx.problems)


def test_coco_structural_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [')
    with pytest.raises(DatasetError, match=r"bad.json:1: not valid JSON"):
        load_index(bad, "train")
    no_cats = tmp_path / "nocats.json"
    no_cats.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DatasetError, match="categories"):
        load_index(no_cats, "train")
    path, _ = make_coco(tmp_path / "c")
    with pytest.raises(DatasetError, match="instances_train.json"):
        load_index(tmp_path / "c", "train")
    doc = json.loads(path.read_text())
    doc["images"][0]["file_name"] = "elsewhere.jpg"
    doc["images"][1]["file_name"] = "elsewhere2.jpg"
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="cannot find its images"):
        load_index(tmp_path / "c", "val")


def _hostile_ids_doc(path: Path) -> dict:
    doc = json.loads(path.read_text())
    # a third image reuses id 42 (x.jpg's): y.jpg would silently get x.jpg's polygons
    doc["images"].append({"id": 42, "file_name": "y.jpg", "width": W, "height": H})
    # annotation ids 1 and 4 both used twice; one annotation points at an image id nothing has
    doc["annotations"].append({"id": 4, "image_id": 7, "category_id": 12, "iscrowd": 0, "bbox": [2, 2, 9, 9],
                               "segmentation": [[2, 2, 11, 2, 11, 11]]})
    doc["annotations"].append({"id": 31, "image_id": 555, "category_id": 12, "iscrowd": 0, "bbox": [1, 1, 5, 5]})
    return doc


def test_duplicate_image_and_annotation_ids_are_reported_never_merged(tmp_path):
    import io

    from dfineseg.data.checks import run_check
    from dfineseg.data.index import ERROR, WARNING

    path, _ = make_coco(tmp_path)
    path.write_text(json.dumps(_hostile_ids_doc(path)))
    idx = load_index(tmp_path, "val")
    # both images claiming id 42 are skipped with their annotations; image 7 keeps what is unambiguous
    assert [r.image_id for r in idx.images] == [7]
    dup_images = [p for p in idx.problems if "image id 42 is used by 2 images" in p.reason]
    assert len(dup_images) == 2 and all(p.severity == ERROR and p.file == str(path) for p in dup_images)
    assert {"this one is x.jpg" in p.reason for p in dup_images} == {True, False}
    assert all("unique" in p.action or "its own id" in p.action for p in dup_images)
    # annotation id 4 is used twice: both skipped (image 7 loses its box-only annotation 4 and the new polygon)
    dup_anns = [p for p in idx.problems if "annotation id 4 is used by 2 annotations" in p.reason]
    assert len(dup_anns) == 2 and all(p.severity == WARNING and "annotation skipped" in p.action for p in dup_anns)
    assert idx.images[0].instances == []
    unknown = [p for p in idx.problems if "image_id 555" in p.reason]
    assert len(unknown) == 1 and "annotation ids 31" in unknown[0].reason and "skipped" in unknown[0].action
    # `data check` says so (it used to say "no problems found" for the shared id)
    out = io.StringIO()
    report = run_check(str(tmp_path), splits=["val"], stream=out)
    assert not report.ok and report.splits["val"].skipped >= 2
    assert f"{path}: image id 42 is used by 2 images" in out.getvalue()


def test_file_name_outside_the_image_folder_is_refused_unless_allowed(tmp_path):
    from dfineseg.data.coco import load_coco_index
    from dfineseg.data.index import ERROR

    path, _ = make_coco(tmp_path / "ds")
    outside = tmp_path / "secret.jpg"
    cv2.imwrite(str(outside), np.full((H, W, 3), 90, np.uint8))
    doc = json.loads(path.read_text())
    doc["images"][0]["file_name"] = "../../../secret.jpg"  # images/val/../../../ = tmp_path
    doc["images"][1]["file_name"] = str(outside)
    doc["images"].append({"id": 8, "file_name": str(tmp_path / "ds" / "images" / "val" / "y.jpg"), "width": W, "height": H})
    doc["images"].append({"id": 9, "file_name": "./x.jpg", "width": W, "height": H})
    path.write_text(json.dumps(doc))
    idx = load_coco_index(tmp_path / "ds", "val")
    # an absolute path under the image folder and a ./ name are fine
    assert [r.image_id for r in idx.images] == [8, 9]
    refused = {p.reason.split(":")[0]: p for p in idx.problems if "points outside the image folder" in p.reason}
    assert set(refused) == {"image id 42", "image id 7"}
    assert all(p.severity == ERROR and p.file == str(path) and "allow_outside_root" in p.action for p in refused.values())
    assert "'../../../secret.jpg'" in refused["image id 42"].reason
    opted_in = load_coco_index(tmp_path / "ds", "val", allow_outside_root=True)
    assert sorted(r.image_id for r in opted_in.images) == [7, 8, 9, 42]
    assert {r.file.resolve() for r in opted_in.images if r.image_id in (7, 42)} == {outside.resolve()}
    # The opt-in is the config key data.allow_outside_root, which every dataset load passes on.
    from dfineseg.config import build_config

    cfg = build_config({"data": {"path": str(tmp_path / "ds"), "allow_outside_root": True}})
    assert len(load_index(cfg.data.path, "val", allow_outside_root=cfg.data.allow_outside_root).images) == 4
    assert len(load_index(cfg.data.path, "val").images) == 2
    cli = [sys.executable, "-m", "dfineseg.cli", "data", "check", f"data={tmp_path / 'ds'}", "splits=val"]
    refused_run = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert "points outside the image folder" in refused_run.stdout and "data.allow_outside_root" in refused_run.stdout
    allowed_run = subprocess.run(cli + ["allow_outside_root=true"], capture_output=True, text=True, timeout=120)
    assert allowed_run.returncode == 0 and "points outside the image folder" not in allowed_run.stdout, allowed_run
