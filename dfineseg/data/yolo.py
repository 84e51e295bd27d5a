"""Ultralytics-style YOLO datasets: data.yaml + images/ + parallel labels/ (no torch).

data.yaml keys: `path` (dataset root; relative paths are taken from the yaml's folder, and a missing
`path` means that folder), `train`, `val`, optional `test` (each a folder, a .txt list of image paths, an
image, or a list of those) and `names` (a list, or a dict {0: name, ...}).

A label line is `cls cx cy w h` (a box; no mask target) or `cls x1 y1 x2 y2 x3 y3 ...` (a polygon), all
normalised to 0..1; both kinds may be mixed in one file (exactly four numbers are always a box, as in
Ultralytics). Faulty lines are skipped and reported with file and line; the rest of the image is kept.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

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
from dfineseg.infer.image_io import IMAGE_SUFFIXES, ImageReadError, probe_image

SPLIT_KEYS = ("train", "val", "test")
# Coordinates this far outside 0..1 are rounding noise from annotation tools: clip them. Beyond: a bug.
COORD_TOLERANCE = 0.01


@dataclass
class YoloSpec:
    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, list[str]]


def _names(raw, yaml_path: Path) -> list[str]:
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    if isinstance(raw, dict) and raw:
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: `names` keys must be class indices 0..C-1, got {list(raw)}") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{yaml_path}: `names` keys must be 0..{len(keys) - 1} without gaps, got {keys}")
        by_int = {int(k): v for k, v in raw.items()}
        return [str(by_int[k]) for k in keys]
    raise DatasetError(
        f"{yaml_path}: `names` is missing or empty; give the class names as a list (names: [cat, dog]) "
        "or a dict (names: {0: cat, 1: dog})"
    )


def read_data_yaml(yaml_path: str | Path) -> YoloSpec:
    yaml_path = Path(yaml_path)
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"{yaml_path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise DatasetError(f"{yaml_path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with keys path, train, val, names")
    # No `path:` means the yaml's own folder; a relative `path:` is relative to that folder.
    root = Path(raw["path"]).expanduser() if raw.get("path") else Path("")
    if not root.is_absolute():
        root = yaml_path.parent / root
    names = _names(raw.get("names"), yaml_path)
    if "nc" in raw and raw["nc"] != len(names):
        raise DatasetError(f"{yaml_path}: nc={raw['nc']} but `names` has {len(names)} entries; make them agree")
    splits: dict[str, list[str]] = {}
    for key in SPLIT_KEYS:
        value = raw.get(key)
        if value is None or value == "" or value == []:
            continue
        entries = value if isinstance(value, list) else [value]
        splits[key] = [str(e) for e in entries]
    return YoloSpec(yaml_path, root, names, splits)


def label_path_for(image: Path) -> Path:
    """images/ -> labels/ at the last occurrence (Ultralytics' rule); the label sits beside the image otherwise."""
    text = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in text:
        head, tail = text.rsplit(sa, 1)
        text = head + sb + tail
    return Path(text).with_suffix(".txt")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def _resolve(entry: str, base: Path) -> Path:
    p = Path(entry).expanduser()
    return p if p.is_absolute() else base / p


def split_images(spec: YoloSpec, split: str) -> tuple[list[Path], list[Problem]]:
    """Image files of a split (deduplicated), and problems with listed-but-missing files."""
    if split not in spec.splits:
        defined = ", ".join(spec.splits) or "none"
        raise DatasetError(f"{spec.yaml_path}: no `{split}:` entry (splits defined: {defined}); add `{split}: images/{split}`")
    files: list[Path] = []
    problems: list[Problem] = []
    for entry in spec.splits[split]:
        p = _resolve(entry, spec.root)
        if p.is_dir():
            # a dangling symlink is kept in the list so that probing reports it instead of it vanishing
            files += [f for f in p.rglob("*") if _is_image(f) and (f.is_file() or _dangling(f))]
        elif p.is_file() and p.suffix.lower() == ".txt":
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{p}: cannot read the image list ({exc})") from None
            for n, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                img = _resolve(line, p.parent)
                if not img.exists() and not Path(line).is_absolute():
                    img = _resolve(line, spec.root)  # Ultralytics lists may be relative to the dataset root
                if img.is_file():
                    files.append(img)
                elif _dangling(img):
                    problems.append(Problem(
                        str(p), n, f"listed image {line} is a broken symlink (its target {os.readlink(img)} does not exist)",
                        "image skipped; fix or remove the link", ERROR,
                    ))
                else:
                    problems.append(Problem(str(p), n, f"listed image {line} does not exist", "skipped", ERROR))
        elif p.is_file() and _is_image(p):
            files.append(p)
        else:
            raise DatasetError(
                f"{spec.yaml_path}: `{split}: {entry}` resolves to {p}, which is not a folder, a .txt image list "
                f"or an image; fix the path (relative paths start at `path:` = {spec.root})"
            )
    return sorted(set(files), key=lambda f: _sort_key(f, spec.root)), problems


def _dangling(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _sort_key(f: Path, root: Path) -> str:
    try:
        return f.relative_to(root).as_posix()
    except ValueError:
        return f.as_posix()


def _clip_coords(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> tuple[np.ndarray | None, bool]:
    """Values normalised to 0..1: None when out by more than the tolerance, else (clipped, was_clipped)."""
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if lo < -COORD_TOLERANCE or hi > 1 + COORD_TOLERANCE:
        return None, False
    if lo >= 0.0 and hi <= 1.0:
        return values, False
    return values.clip(0.0, 1.0), True


def parse_label_text(
    text: str, width: int, height: int, num_classes: int, file: str, box_lines: list[int] | None = None
) -> tuple[list[Instance], list[Problem]]:
    """Parse one YOLO label file's text into instances in pixels of a (width, height) image.

    `box_lines`, when given, receives the line numbers of the kept box-only instances (no mask target).
    """
    instances: list[Instance] = []
    problems: list[Problem] = []
    seen: set[tuple[float, ...]] = set()
    scale = np.array([width, height], dtype=np.float64)

    def skip(n: int, reason: str) -> None:
        problems.append(Problem(file, n, reason, "line skipped", WARNING))

    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            skip(n, f"not numbers: {line.strip()[:60]!r}")
            continue
        cls = values[0]
        coords = np.array(values[1:], dtype=np.float64)
        # min/max propagate NaN and keep Inf, so two reductions answer both "finite?" and "in range?"
        lo, hi = (float(coords.min()), float(coords.max())) if len(coords) else (0.0, 0.0)
        if not (math.isfinite(cls) and math.isfinite(lo) and math.isfinite(hi)):
            skip(n, "NaN or Inf value")
            continue
        if cls != int(cls):
            skip(n, f"class id {tokens[0]} is not an integer")
            continue
        if not 0 <= int(cls) < num_classes:
            skip(n, f"class id {int(cls)} out of range 0..{num_classes - 1}")
            continue
        if len(coords) != 4 and len(coords) % 2:
            skip(n, f"{len(coords)} coordinates: expected 4 (cx cy w h) or an even number (x y pairs of a polygon)")
            continue
        if len(coords) == 2:
            skip(n, "polygon with fewer than 3 points (1 point)")
            continue
        key = (cls, *values[1:])
        if key in seen:
            problems.append(Problem(file, n, "duplicate of an earlier line", "deduplicated", INFO))
            continue
        seen.add(key)
        if len(coords) == 4:
            cx, cy, w, h = coords
            if w <= 0 or h <= 0:
                skip(n, f"box with zero or negative size (w={w:g}, h={h:g})")
                continue
            corners, clipped = _clip_coords(np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
            if corners is None:
                skip(n, f"box outside [0,1] by more than {COORD_TOLERANCE}")
                continue
            box = (corners.reshape(2, 2) * scale).reshape(4).astype(np.float32)
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                skip(n, "box has no area inside the image")
                continue
            instances.append(Instance(int(cls), box))
            if box_lines is not None:
                box_lines.append(n)
        else:
            pts, clipped = _clip_coords(coords, lo, hi)
            if pts is None:
                skip(n, f"polygon outside [0,1] by more than {COORD_TOLERANCE}")
                continue
            poly = (pts.reshape(-1, 2) * scale).astype(np.float32)
            if polygon_area(poly) <= 0:  # positive area implies >= 3 distinct, non-collinear points
                distinct = len(np.unique(poly, axis=0))
                if distinct < 3:
                    skip(n, f"polygon with fewer than 3 distinct points ({distinct})")
                else:
                    skip(n, "polygon has zero area (all points on a line)")
                continue
            instances.append(Instance(int(cls), polygons_box([poly]), polygons=[poly], has_mask=True))
        if clipped:
            problems.append(
                Problem(file, n, f"coordinates slightly outside [0,1] (within {COORD_TOLERANCE})", "clipped", INFO)
            )
    return instances, problems


def load_yolo_index(yaml_path: str | Path, split: str, decode: bool = False) -> DatasetIndex:
    """Parse one split. `decode=True` fully decodes every image (slower; `data check` does it)."""
    spec = read_data_yaml(yaml_path)
    files, problems = split_images(spec, split)
    images: list[ImageRecord] = []
    n_missing_labels = 0
    if not files:
        where = ", ".join(str(_resolve(e, spec.root)) for e in spec.splits[split])
        problems.append(Problem(str(spec.yaml_path), None, f"split '{split}' has no images (looked in {where})", "nothing to load", WARNING))
    shared = _images_sharing_a_label(files)
    box_only: list[Problem] = []
    for image_id, img in enumerate(files, 1):  # ids follow the sorted relative paths, stable across runs
        if img in shared:
            label, others = shared[img]
            problems.append(Problem(
                str(img), None,
                f"shares the label file {label} with {', '.join(str(o) for o in others)}: "
                "which image its lines belong to is unknown",
                "image skipped, and so is every image sharing that file; rename the images (and the label file) "
                "so each image has its own",
                ERROR,
            ))
            continue
        try:
            info = probe_image(img, decode=decode)
        except ImageReadError as exc:
            problems.append(Problem(str(img), None, exc.reason, "image skipped", ERROR))
            continue
        problems += [Problem(str(img), None, c, "converted, kept", INFO) for c in info.conversions]
        label = label_path_for(img)
        instances: list[Instance] = []
        try:
            raw = label.read_bytes()
        except FileNotFoundError:
            n_missing_labels += 1
            problems.append(Problem(str(img), None, f"no label file ({label})", "background image, kept", INFO))
            raw = None
        except OSError as exc:
            problems.append(Problem(str(label), None, f"cannot read ({exc.strerror})", "background image, kept", WARNING))
            raw = None
        if raw is not None:
            try:
                text = raw.decode("utf-8-sig")  # tolerate a byte-order mark from Windows editors
            except UnicodeDecodeError:
                problems.append(Problem(str(label), None, "not UTF-8 text", "background image, kept", WARNING))
                text = None
            if text is not None and not text.strip():
                problems.append(Problem(str(label), None, "empty label file", "background image, kept", INFO))
            elif text is not None:
                box_lines: list[int] = []
                instances, line_problems = parse_label_text(
                    text, info.width, info.height, len(spec.names), str(label), box_lines
                )
                problems += line_problems
                box_only += [
                    Problem(str(label), n, BOX_ONLY_REASON, BOX_ONLY_ACTION, INFO)
                    for n in box_lines[: max(0, BOX_ONLY_EXAMPLES - len(box_only))]
                ]
        images.append(ImageRecord(image_id, img, info.width, info.height, instances))
    if images and n_missing_labels == len(images):
        problems.append(
            Problem(
                str(spec.yaml_path), None,
                f"none of the {len(files)} '{split}' images has a label file (looked for e.g. {label_path_for(files[0])})",
                "all images used as background; put labels in the labels/ folder parallel to images/",
                WARNING,
            )
        )
    return DatasetIndex(
        names=spec.names,
        category_ids=list(range(len(spec.names))),
        images=images,
        problems=problems,
        format="yolo",
        split=split,
        source=str(spec.yaml_path),
        box_only_examples=box_only,
    )


def _images_sharing_a_label(files: list[Path]) -> dict[Path, tuple[Path, list[Path]]]:
    """image -> (its label file, the other images mapped to it), for label files that exist and serve
    several images (a.jpg and a.png -> labels/a.txt)."""
    by_label: dict[Path, list[Path]] = {}
    for f in files:
        by_label.setdefault(label_path_for(f), []).append(f)
    shared: dict[Path, tuple[Path, list[Path]]] = {}
    for label, imgs in by_label.items():
        if len(imgs) > 1 and (label.exists() or label.is_symlink()):
            for img in imgs:
                shared[img] = (label, [o for o in imgs if o != img])
    return shared
