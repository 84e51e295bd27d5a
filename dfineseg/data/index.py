"""The parsed dataset: one `DatasetIndex` per split, whatever the source format (no torch).

Masks stay compact: polygons (float32 pixel coordinates) or a COCO compressed RLE; nothing is
rasterised here. `__slots__` keeps a million instances well under the 2 GB budget
(benchmarks/dataset_memory.py measures it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfineseg.infer.errors import UserError


class DatasetError(UserError, ValueError):
    """The dataset as a whole cannot be read (bad data.yaml, missing split, bad json); names file and fix."""


# Severity of a problem: what happened to the data because of it.
ERROR = "error"  # the image is skipped
WARNING = "warning"  # one label line / annotation is skipped, or the split looks wrong
INFO = "info"  # converted, clipped, deduplicated or background: the data is kept

# Box-only instances (a YOLO `cls cx cy w h` line, a COCO annotation without segmentation) are valid data,
# not problems, but get no mask loss in the segment task: the index keeps where the first few are, so
# `data check` can point at them without a million-box detection set costing a Problem per box.
BOX_ONLY_EXAMPLES = 20
BOX_ONLY_REASON = "box without a polygon or mask"
BOX_ONLY_ACTION = "kept as a box: no mask loss for it in the segment task"


@dataclass(slots=True)
class Problem:
    """One thing wrong with the user's files, with where it is and what was done about it."""

    file: str
    line: int | None
    reason: str
    action: str
    severity: str = WARNING

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.reason} -> {self.action}"


@dataclass(slots=True)
class Instance:
    label: int
    box_xyxy: np.ndarray  # float32 [4], pixels of the displayed image
    polygons: list[np.ndarray] | None = None  # float32 [K,2] pixel coordinates, parts are unioned
    rle: dict | None = None  # COCO compressed RLE at the image size
    iscrowd: bool = False
    has_mask: bool = False


@dataclass(slots=True)
class ImageRecord:
    image_id: int
    file: Path
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class DatasetIndex:
    names: list[str]
    category_ids: list[int]
    images: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    format: str = ""  # "yolo" | "coco"
    split: str = ""
    source: str = ""  # the data.yaml / json it came from
    box_only_examples: list[Problem] = field(default_factory=list)  # the first BOX_ONLY_EXAMPLES, in file order

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def instances_per_class(self, include_crowd: bool = False) -> list[int]:
        counts = Counter(
            inst.label for rec in self.images for inst in rec.instances if include_crowd or not inst.iscrowd
        )
        return [counts.get(c, 0) for c in range(self.num_classes)]

    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(p.severity for p in self.problems))

    def summary(self, max_problems: int = 10) -> str:
        """A few lines for the training log: totals, counts per severity and the first problems."""
        n_inst = sum(self.instances_per_class())
        bg = sum(1 for r in self.images if not r.instances)
        lines = [
            f"{self.split}: {len(self.images)} images ({bg} background), {n_inst} instances, "
            f"{self.num_classes} classes [{self.format}: {self.source}]"
        ]
        if self.problems:
            counts = self.problem_counts()
            lines.append(
                f"{self.split}: {len(self.problems)} dataset problems "
                f"({counts.get(ERROR, 0)} images skipped, {counts.get(WARNING, 0)} labels skipped, "
                f"{counts.get(INFO, 0)} fixed/converted); run `dfineseg data check data=...` for the full list"
            )
            ordered = sorted(self.problems, key=lambda p: {ERROR: 0, WARNING: 1}.get(p.severity, 2))
            lines += [f"  {p}" for p in ordered[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


def polygon_area(points: np.ndarray) -> float:
    """Absolute shoelace area of a [K,2] polygon."""
    if len(points) < 3:
        return 0.0
    x = points[:, 0].astype(np.float64)
    y = points[:, 1].astype(np.float64)
    twice = np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1]
    return 0.5 * abs(float(twice))


def polygons_box(polygons: list[np.ndarray]) -> np.ndarray:
    pts = polygons[0] if len(polygons) == 1 else np.concatenate(polygons, axis=0)
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)]).astype(np.float32)
