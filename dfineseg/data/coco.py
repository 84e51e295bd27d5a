"""COCO instance-segmentation json (no torch).

Segmentations may be polygons (a list of flat [x1,y1,x2,y2,...] lists, parts unioned) or RLE
(compressed `counts` string or uncompressed `counts` list). Category ids may be any integers: they are
sorted and mapped to contiguous labels 0..C-1 (`DatasetIndex.category_ids[label]` maps back). Image ids
are kept. Faulty annotations are skipped and reported by annotation id; the rest is kept. Ids must be
unique: images sharing an id, annotations sharing an id and annotations of a missing image id are skipped
and reported, never merged. A `file_name` outside the image folder (absolute elsewhere, or `..` past it) is
refused unless the caller passes `allow_outside_root=True`.

Where the images are: `file_name` is looked up under the first of these folders that holds the first
images (root = the json's folder, or its parent when that folder is `annotations/`):
root/images/<split>, root/<split>, root/<split>2017, root/images, root, the json's folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from pycocotools import mask as mask_utils

from dfineseg.data.index import (
    BOX_ONLY_ACTION,
    BOX_ONLY_EXAMPLES,
    BOX_ONLY_REASON,
    ERROR,
    INFO,
    WARNING,
    DatasetError,
    DatasetIndex,
    ImageRecord,
    Instance,
    Problem,
    polygon_area,
    polygons_box,
)
from dfineseg.data.yolo import COORD_TOLERANCE
from dfineseg.infer.image_io import ImageReadError, probe_image

SPLIT_TOKENS = ("train", "val", "test")


def annotation_files(folder: Path) -> dict[str, Path]:
    """split -> json for a COCO folder (annotations/instances_<split>.json or annotations/<split>.json)."""
    found: dict[str, Path] = {}
    ann_dir = folder / "annotations"
    if ann_dir.is_dir():
        for f in sorted(ann_dir.glob("*.json")):
            m = re.fullmatch(r"(?:instances_)?(.+)\.json", f.name)
            if m:
                split = re.sub(r"2017$", "", m.group(1))  # instances_val2017.json -> val
                found.setdefault(split, f)
    return found


def split_of_json(json_path: Path) -> str:
    for token in SPLIT_TOKENS:
        if re.search(rf"(^|[^a-z]){token}", json_path.stem):
            return token
    return json_path.stem


def json_for_split(path: Path, split: str) -> tuple[Path, list[Problem]]:
    """The annotation file to use for `split`, given what `data=` points at (a json or a COCO folder)."""
    if path.is_dir():
        files = annotation_files(path)
        if split in files:
            return files[split], []
        raise DatasetError(
            f"{path}: no COCO annotations for split '{split}': expected {path / 'annotations' / f'instances_{split}.json'}"
            + (f" (found splits: {', '.join(files)})" if files else "")
        )
    own = split_of_json(path)
    if own == split:
        return path, []
    if own in SPLIT_TOKENS:
        sibling = path.with_name(path.name.replace(own, split))
        if sibling.is_file():
            return sibling, []
    note = Problem(
        str(path), None, f"no separate '{split}' annotation file next to it",
        f"using this file for '{split}' too; point data= at a folder with annotations/instances_{split}.json to separate them",
        WARNING,
    )
    return path, [note]


def _image_root(json_path: Path, split: str, file_names: list[str]) -> Path:
    base = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    candidates = [base / "images" / split, base / split, base / f"{split}2017", base / "images", base, json_path.parent]
    probe = [f for f in file_names if not Path(f).is_absolute()][:3]
    if not probe:
        return base
    for cand in candidates:
        if any((cand / f).is_file() for f in probe):
            return cand
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DatasetError(
        f"{json_path}: cannot find its images (e.g. '{probe[0]}'); looked in {tried}. "
        "Put them in images/<split>/ next to the annotations/ folder"
    )


def _load_json(json_path: Path) -> dict:
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"{json_path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{json_path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{json_path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{json_path}: expected a COCO object with images, annotations and categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(raw.get(k), list)]
    if missing:
        raise DatasetError(f"{json_path}: not a COCO instances file (missing list(s): {', '.join(missing)})")
    return raw


def category_mapping(categories: list[dict], json_path: Path) -> tuple[list[int], list[str]]:
    """Sorted category ids (label i <-> category_ids[i]) and their names."""
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in cats]
        names = [str(c.get("name", c["id"])) for c in cats]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{json_path}: every category needs an integer `id` and a `name`") from None
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{json_path}: duplicate category ids {sorted(i for i in ids if ids.count(i) > 1)}")
    if not ids:
        raise DatasetError(f"{json_path}: `categories` is empty")
    return ids, names


def _finite(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _parse_segmentation(seg, w: int, h: int) -> tuple[list[np.ndarray] | None, dict | None, str | None, bool]:
    """-> (polygons, rle, error, clipped). Polygons in pixels, RLE compressed with bytes counts."""
    if isinstance(seg, dict):
        size = seg.get("size")
        counts = seg.get("counts")
        if not isinstance(size, list) or len(size) != 2 or counts is None:
            return None, None, "RLE without `size` [h, w] and `counts`", False
        if [int(size[0]), int(size[1])] != [h, w]:
            return None, None, f"RLE size {size} differs from the image size [{h}, {w}]", False
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        if mask_utils.area(rle) <= 0:
            return None, None, "empty RLE mask", False
        return None, {"size": [h, w], "counts": rle["counts"]}, None, False
    if not isinstance(seg, list) or not seg:
        return None, None, None, False  # no mask: a box-only annotation
    polygons: list[np.ndarray] = []
    clipped = False
    too_few = False
    limit = np.array([w, h], dtype=np.float64)
    for part in seg:
        if not isinstance(part, list) or not _finite(part):
            return None, None, "polygon with NaN/Inf or non-numeric coordinates", False
        if len(part) % 2:
            return None, None, f"polygon with an odd number of coordinates ({len(part)})", False
        pts = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        norm = pts / limit
        if norm.min() < -COORD_TOLERANCE or norm.max() > 1 + COORD_TOLERANCE:
            return None, None, f"polygon outside the image by more than {COORD_TOLERANCE:.0%}", False
        fixed = np.clip(pts, 0, limit)
        clipped |= bool((fixed != pts).any())
        if len(pts) < 3 or polygon_area(fixed) <= 0:
            too_few = True
            continue
        polygons.append(fixed.astype(np.float32))
    if not polygons:
        reason = "polygon with fewer than 3 points" if too_few else "polygon has zero area"
        return None, None, reason, False
    return polygons, None, None, clipped


def load_coco_index(
    path: str | Path,
    split: str,
    decode: bool = False,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> DatasetIndex:
    """Parse the annotations of `split` from a COCO json (or a COCO folder).

    Ids must be unique: images sharing an id are all skipped (whose annotations they are is unknown),
    annotations sharing an id are all skipped, annotations of unknown image ids are skipped; all reported.
    A `file_name` that leaves the image folder (absolute, or `..` past it) is a problem (image skipped)
    unless `allow_outside_root=True`.
    """
    json_path, problems = json_for_split(Path(path), split)
    raw = _load_json(json_path)
    category_ids, names = category_mapping(raw["categories"], json_path)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    src = str(json_path)

    entries_by_id: dict[int, list[dict]] = {}
    for img in raw["images"]:
        try:
            image_id = int(img["id"])
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(src, None, f"image entry without an integer id: {str(img)[:80]}", "skipped", ERROR))
            continue
        entries_by_id.setdefault(image_id, []).append(img)
    entries = {i: e[0] for i, e in entries_by_id.items() if len(e) == 1}

    anns_by_image: dict[int, list[dict]] = {}
    anns_by_id: dict[object, list[dict]] = {}
    for ann in raw["annotations"]:
        key = ann.get("image_id") if isinstance(ann, dict) else None
        try:
            key = int(key)
        except (TypeError, ValueError):
            pass  # reported below as an unknown image id
        anns_by_image.setdefault(key, []).append(ann)
        if isinstance(ann, dict) and ann.get("id") is not None:
            anns_by_id.setdefault(str(ann["id"]), []).append(ann)

    for image_id, dup in sorted(entries_by_id.items()):
        if len(dup) == 1:
            continue
        n_anns = len(anns_by_image.get(image_id, []))
        files = [str(e.get("file_name", "")) for e in dup]
        for f in files:
            problems.append(Problem(
                src, None,
                f"image id {image_id} is used by {len(dup)} images ({', '.join(files)}); this one is {f}: "
                f"which image its {n_anns} annotation(s) belong to is unknown",
                "image skipped with its annotations, like every image with this id; give each image its own id "
                "in `images` and point each annotation's image_id at the right one",
                ERROR,
            ))
    duplicated_ann = {id(a) for anns in anns_by_id.values() if len(anns) > 1 for a in anns}
    for aid, anns in anns_by_id.items():
        if len(anns) > 1:
            owners = ", ".join(str(a.get("image_id")) for a in anns)
            for a in anns:
                problems.append(Problem(
                    src, None,
                    f"annotation id {aid} is used by {len(anns)} annotations (of image ids {owners}); "
                    f"this one is of image id {a.get('image_id')}",
                    "annotation skipped, like every annotation with this id; give each annotation its own id",
                    WARNING,
                ))
    for image_id in anns_by_image:
        if image_id not in entries_by_id:
            anns = anns_by_image[image_id]
            ids = [str(a.get("id")) if isinstance(a, dict) else "?" for a in anns]
            listed = ", ".join(ids[:10]) + (f", ... {len(ids) - 10} more" if len(ids) > 10 else "")
            problems.append(Problem(
                src, None, f"{len(anns)} annotation(s) for image_id {image_id!r}, which no entry in `images` has "
                f"(annotation ids {listed})",
                "annotations skipped; add the image to `images` or correct their image_id", WARNING,
            ))

    file_names = [str(entries[i].get("file_name", "")) for i in sorted(entries)]
    probe = [f for f in file_names if allow_outside_root or _inside(f)]  # a `..` name must not pick the root
    root = Path(image_root) if image_root is not None else _image_root(json_path, split, probe)

    images: list[ImageRecord] = []
    box_only: list[Problem] = []
    for image_id in sorted(entries):
        entry = entries[image_id]
        name = entry.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.append(Problem(
                src, None, f"image id {image_id}: no usable `file_name` ({name!r})", "image skipped; give its file name", ERROR
            ))
            continue
        if not allow_outside_root and not _within(name, root):
            problems.append(Problem(
                src, None, f"image id {image_id}: file_name {name!r} points outside the image folder {root}",
                "image skipped; move the image under that folder and give a relative file_name, or load with "
                "data.allow_outside_root=true if the json is trusted",
                ERROR,
            ))
            continue
        file = root / name
        try:
            info = probe_image(file, decode=decode)
        except ImageReadError as exc:
            problems.append(Problem(str(file), None, exc.reason, "image skipped", ERROR))
            continue
        problems += [Problem(str(file), None, c, "converted, kept", INFO) for c in info.conversions]
        w, h = info.width, info.height
        jw, jh = entry.get("width"), entry.get("height")
        if jw is not None and jh is not None and (int(jw), int(jh)) != (w, h):
            problems.append(
                Problem(str(file), None, f"{json_path.name} says {jw}x{jh} but the image is {w}x{h}", "image skipped", ERROR)
            )
            continue
        instances: list[Instance] = []
        seen: set[str] = set()
        for ann in anns_by_image.get(image_id, []):
            if id(ann) in duplicated_ann:
                continue  # reported above
            inst, problem = _parse_annotation(ann, w, h, label_of, src)
            if problem is not None:
                problems.append(problem)
            if inst is None:
                continue
            key = json.dumps([ann.get("category_id"), ann.get("bbox"), ann.get("segmentation")], default=str)
            if key in seen:
                problems.append(Problem(src, None, f"annotation {ann.get('id')} duplicates another", "deduplicated", INFO))
                continue
            seen.add(key)
            instances.append(inst)
            if not inst.has_mask and not inst.iscrowd and len(box_only) < BOX_ONLY_EXAMPLES:
                box_only.append(Problem(
                    src, None, f"annotation {ann.get('id')} (image id {image_id}): {BOX_ONLY_REASON}", BOX_ONLY_ACTION, INFO
                ))
        images.append(ImageRecord(image_id, file, w, h, instances))
    return DatasetIndex(
        names, category_ids, images, problems, format="coco", split=split, source=src, box_only_examples=box_only
    )


def _within(file_name: str, root: Path) -> bool:
    """`root / file_name` stays inside `root`: a relative name without `..` past it, or an absolute path under
    it. Lexical, so a symlink the user put inside the root is theirs to follow."""
    if _inside(file_name):
        return True
    if not Path(file_name).is_absolute():
        return False
    base = os.path.normcase(os.path.abspath(root)).rstrip(os.sep) + os.sep
    return os.path.normcase(os.path.normpath(file_name)).startswith(base)


def _inside(file_name: str) -> bool:
    """True when `file_name` is relative and stays inside the folder it is joined to (lexically)."""
    if not file_name or PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).anchor:
        return False
    parts = file_name.replace("\\", "/").split("/")
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _parse_annotation(
    ann: dict, w: int, h: int, label_of: dict[int, int], src: str
) -> tuple[Instance | None, Problem | None]:
    aid = ann.get("id")

    def skip(reason: str) -> tuple[None, Problem]:
        return None, Problem(src, None, f"annotation {aid}: {reason}", "annotation skipped", WARNING)

    try:
        cid = int(ann.get("category_id"))
    except (TypeError, ValueError):
        return skip(f"category_id {ann.get('category_id')!r} is not an integer")
    if cid not in label_of:
        return skip(f"unknown category_id {cid}")
    polygons, rle, error, clipped = _parse_segmentation(ann.get("segmentation"), w, h)
    if error:
        return skip(error)
    bbox = ann.get("bbox")
    if polygons is not None:
        box = polygons_box(polygons)
    elif rle is not None:
        x, y, bw, bh = mask_utils.toBbox(rle)
        box = np.array([x, y, x + bw, y + bh], dtype=np.float32)
    elif isinstance(bbox, list) and len(bbox) == 4 and _finite(bbox):
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            return skip(f"bbox with zero or negative size {bbox}")
        norm = np.array([x / w, y / h, (x + bw) / w, (y + bh) / h])
        if norm.min() < -COORD_TOLERANCE or norm.max() > 1 + COORD_TOLERANCE:
            return skip(f"bbox outside the image by more than {COORD_TOLERANCE:.0%}")
        box = np.clip(np.array([x, y, x + bw, y + bh]), 0, [w, h, w, h]).astype(np.float32)
        clipped = bool((box != np.array([x, y, x + bw, y + bh], dtype=np.float32)).any())
    else:
        return skip("no usable segmentation or bbox (NaN/Inf or malformed)")
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        return skip("zero-size region")
    inst = Instance(
        label_of[cid], box, polygons=polygons, rle=rle, iscrowd=bool(ann.get("iscrowd", 0)),
        has_mask=polygons is not None or rle is not None,
    )
    note = None
    if clipped:
        note = Problem(src, None, f"annotation {aid}: coordinates slightly outside the image", "clipped", INFO)
    return inst, note
