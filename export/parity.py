"""Parity: every exported artefact is run next to the PyTorch model and must agree with it.

`run_parity` runs one artefact through the checks and writes its report (`ParityReport`, next to the
artefact: `report_path`). The parts, one job each:

- `dfineseg.export.parity_data`: the images (`ParityData`) and PyTorch's answers on them (`Reference`,
  `torch_reference`), computed once per export;
- `dfineseg.export.parity_checks`: the checks (raw, outputs, detections, dynamic_batch, f1) and the
  noise floor of FP16's limits;
- `dfineseg.export.tolerances`: the limits, per precision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.export.errors import ParityError
from dfineseg.export.parity_checks import (
    Check,
    apply_noise_floor,
    check_detections,
    check_device_default,
    check_dynamic_batch,
    check_f1,
    check_outputs,
    check_raw,
)
from dfineseg.export.parity_data import Forward, ParityData, Reference, collect_outputs, detections_for, f1_of
from dfineseg.export.tolerances import Tolerance
from dfineseg.utils.io import atomic_write_bytes


@dataclass
class ParityReport:
    artefact: str
    precision: str
    runtime: dict[str, Any]
    data_source: str
    images: int
    raw_images: int
    checks: list[Check]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, default=_json_default).encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def report_path(artefact: Path) -> Path:
    """`model.onnx` -> `model.onnx.parity.json`; an IR folder or its model.xml -> `<folder>/parity.json`."""
    if artefact.is_dir():
        return artefact / "parity.json"
    if artefact.suffix == ".xml":
        return artefact.parent / "parity.json"
    return artefact.with_name(artefact.name + ".parity.json")


def run_parity(
    artefact: Path,
    precision: str,
    forward: Forward,
    fixed_batch: int | None,
    data: ParityData,
    ref: Reference,
    tol: Tolerance,
    raw_forward: Forward | None = None,
    runtime: dict[str, Any] | None = None,
    raise_on_failure: bool = True,
    open_device_default: Callable[[], tuple[Forward, int | None, dict[str, Any]]] | None = None,
) -> ParityReport:
    """Compare one artefact with the reference, write its report JSON, raise ParityError on failure.
    `open_device_default`: for a runtime with a precision choice, the artefact opened at the device's default
    precision (the `device_default` smoke check)."""
    t0 = time.perf_counter()
    checks: list[Check] = []
    if raw_forward is not None and ref.raw is not None:
        raw_got, _ = collect_outputs(raw_forward, data.raw_images, data, None)
        checks.append(check_raw(ref.raw, raw_got, tol, int(ref.outputs["scores"].shape[1]), data.conf))
    else:
        checks.append(Check("raw", None, tol.raw, True, False, {"skipped": "no pre-top-K twin graph for this artefact"}))
    got, metas = collect_outputs(forward, data.raw_images, data, fixed_batch)
    checks.append(check_outputs(ref.outputs, got, tol, data.conf))
    got_dets = detections_for(forward, data, fixed_batch)
    n_raw = len(data.raw_images)
    checks.append(check_detections(ref.detections[:n_raw], got_dets[:n_raw], data.conf, tol))
    if fixed_batch is None and len(data.raw_images) > 1:
        checks.append(check_dynamic_batch(forward, data, tol))
    checks.append(check_f1(ref.f1, f1_of(got_dets, data), tol, ref.detections, got_dets, data))
    if tol.noise_floor:
        apply_noise_floor(checks, ref, data, tol)
    if open_device_default is not None:
        checks.append(check_device_default(open_device_default, runtime or {}, data, ref))
    report = ParityReport(
        artefact=str(artefact),
        precision=precision,
        runtime=runtime or {},
        data_source=data.source,
        images=len(data.images),
        raw_images=n_raw,
        checks=checks,
        seconds=time.perf_counter() - t0,
    )
    report.write(report_path(artefact))
    if raise_on_failure and not report.passed:
        lines = "\n  ".join(c.describe() for c in report.failures())
        raise ParityError(
            f"{artefact}: parity with PyTorch failed ({precision}; report {report_path(artefact)}):\n  {lines}"
        )
    return report
