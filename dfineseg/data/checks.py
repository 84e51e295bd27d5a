"""`dfineseg data check`: validate a dataset, print counts per class and split and every problem.

Read-only by construction: the parsers only open files for reading, and nothing is cached. The same
parsers run when training loads the data, so what `check` reports is what training will do.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from dfineseg.data.index import ERROR, INFO, WARNING, DatasetError, DatasetIndex, Problem
from dfineseg.data.loader import dataset_splits, detect_format, load_index


@dataclass
class SplitReport:
    split: str
    images: int = 0  # kept (background included)
    background: int = 0
    skipped: int = 0
    instances_per_class: list[int] = field(default_factory=list)
    crowd: int = 0
    box_only: int = 0
    problems: list[Problem] = field(default_factory=list)
    box_only_examples: list[Problem] = field(default_factory=list)  # where the first box-only instances are


@dataclass
class CheckReport:
    path: str
    format: str = ""
    names: list[str] = field(default_factory=list)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    fatal: str | None = None  # the dataset (or a split) could not be read at all

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.splits.values() for p in s.problems]

    @property
    def ok(self) -> bool:
        return self.fatal is None and not any(p.severity in (ERROR, WARNING) for p in self.problems)


def _split_report(index: DatasetIndex) -> SplitReport:
    skipped = sum(1 for p in index.problems if p.severity == ERROR)
    return SplitReport(
        split=index.split,
        images=len(index.images),
        background=sum(1 for r in index.images if not r.instances),
        skipped=skipped,
        instances_per_class=index.instances_per_class(),
        crowd=sum(1 for r in index.images for i in r.instances if i.iscrowd),
        box_only=sum(1 for r in index.images for i in r.instances if not i.has_mask and not i.iscrowd),
        problems=list(index.problems),
        box_only_examples=list(index.box_only_examples),
    )


def run_check(
    data_path: str, splits: list[str] | None = None, stream: TextIO | None = None, decode: bool = True,
    allow_outside_root: bool = False,
) -> CheckReport:
    """Check every split (or the given ones), decoding each image fully; print the report to `stream`
    (default: the current sys.stdout; pass `io.StringIO()` to keep it quiet)."""
    report = CheckReport(path=str(data_path))
    out = stream if stream is not None else sys.stdout
    try:
        fmt, resolved = detect_format(data_path)
        report.format = fmt
        wanted = list(splits) if splits else dataset_splits(data_path)
    except DatasetError as exc:
        report.fatal = str(exc)
        print(f"error: {exc}", file=out)
        return report
    if not wanted:
        report.fatal = f"{resolved}: defines no splits (add train: and val:)"
        print(f"error: {report.fatal}", file=out)
        return report
    for split in wanted:
        try:
            index = load_index(data_path, split, decode=decode, allow_outside_root=allow_outside_root)
        except DatasetError as exc:
            report.fatal = str(exc)
            print(f"error ({split}): {exc}", file=out)
            continue
        report.names = index.names
        report.splits[split] = _split_report(index)
    _print(report, resolved, out)
    return report


def _print(report: CheckReport, resolved, out) -> None:
    print(f"dataset: {resolved} ({report.format}, {len(report.names)} classes)", file=out)
    if not report.splits:
        return
    splits = list(report.splits.values())
    print(f"{'split':<10}{'images':>8}{'background':>12}{'skipped':>9}{'instances':>11}{'box-only':>10}{'crowd':>7}", file=out)
    for s in splits:
        print(
            f"{s.split:<10}{s.images:>8}{s.background:>12}{s.skipped:>9}{sum(s.instances_per_class):>11}"
            f"{s.box_only:>10}{s.crowd:>7}",
            file=out,
        )
    width = max([5] + [len(n) for n in report.names]) + 2
    print(f"{'class':<{width}}" + "".join(f"{s.split:>10}" for s in splits), file=out)
    for c, name in enumerate(report.names):
        counts = "".join(f"{(s.instances_per_class[c] if c < len(s.instances_per_class) else 0):>10}" for s in splits)
        print(f"{name:<{width}}{counts}", file=out)
    _print_box_only(splits, out)
    problems = report.problems
    if not problems:
        print("no problems found", file=out)
        return
    by = {sev: sum(1 for p in problems if p.severity == sev) for sev in (ERROR, WARNING, INFO)}
    print(
        f"{len(problems)} problems: {by[ERROR]} images skipped, {by[WARNING]} labels skipped or warnings, "
        f"{by[INFO]} fixed/converted/background",
        file=out,
    )
    for p in problems:
        print(f"  [{p.severity}] {p}", file=out)


def _print_box_only(splits: list[SplitReport], out) -> None:
    """Box-only instances are valid but get no mask loss in the segment task: say where they are."""
    for s in splits:
        if not s.box_only:
            continue
        print(
            f"{s.split}: {s.box_only} box-only instances (no polygon/mask; they get no mask loss in the segment task)",
            file=out,
        )
        for p in s.box_only_examples:
            print(f"  [{p.severity}] {p}", file=out)
        if s.box_only > len(s.box_only_examples):
            print(f"  ... {s.box_only - len(s.box_only_examples)} more", file=out)
