"""`data=` -> the right parser: a data.yaml is YOLO, a .json or a folder with annotations/ is COCO."""

from __future__ import annotations

from pathlib import Path

from dfineseg.data.coco import annotation_files, load_coco_index, split_of_json
from dfineseg.data.index import DatasetError, DatasetIndex
from dfineseg.data.yolo import load_yolo_index, read_data_yaml

EXPECTED = (
    "point data= at a YOLO data.yaml, a COCO instances json, or a COCO folder with "
    "annotations/instances_<split>.json and images/"
)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """-> ("yolo", data.yaml) or ("coco", json-or-folder). Raises `DatasetError` saying what was expected."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}; {EXPECTED}")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return "yolo", p
        if suffix == ".json":
            return "coco", p
        raise DatasetError(f"{p}: not a dataset description (a {suffix or 'suffix-less'} file); {EXPECTED}")
    if annotation_files(p):
        return "coco", p
    yamls = sorted(list(p.glob("*.yaml")) + list(p.glob("*.yml")))
    preferred = [y for y in yamls if y.stem == "data"]
    if preferred or len(yamls) == 1:
        return "yolo", (preferred or yamls)[0]
    found = ", ".join(y.name for y in yamls)
    raise DatasetError(
        f"{p}: cannot tell the dataset format"
        + (f" (several yaml files: {found}; name one)" if yamls else " (no data.yaml and no annotations/*.json)")
        + f"; {EXPECTED}"
    )


def load_index(path: str | Path, split: str, decode: bool = False, allow_outside_root: bool = False) -> DatasetIndex:
    """Parse one split of the dataset `path` points at; per-image problems are in `.problems`.

    `allow_outside_root` (config `data.allow_outside_root`): COCO `file_name`s may leave the image folder.
    A YOLO dataset names its images by folder or list, which the user wrote, so it has no such trap."""
    fmt, p = detect_format(path)
    if fmt == "yolo":
        return load_yolo_index(p, split, decode=decode)
    return load_coco_index(p, split, decode=decode, allow_outside_root=allow_outside_root)


def dataset_splits(path: str | Path) -> list[str]:
    """The splits a dataset defines (YOLO: train/val/test keys; COCO: its annotation files)."""
    fmt, p = detect_format(path)
    if fmt == "yolo":
        return list(read_data_yaml(p).splits)
    if p.is_dir():
        return list(annotation_files(p))
    return [split_of_json(p)]
