"""What one export shares between its artefacts' build steps, and what a build step hands back.

`export_model` makes an `ExportContext` (the plan, the run that stages and publishes artefacts, the
parity data and PyTorch's reference, the pre-top-K twin) and passes it to each artefact's build step
(`Artefact.make(ctx)`, see `dfineseg.export.formats`). A build step makes its artefact in the staging
folder and returns a `Built`; `export_model` then opens it the way users do, checks it and settles it
(promotes it, or keeps it aside as failed). Build steps read what earlier artefacts left in `ctx.made`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfineseg.export.parity_data import Forward

if TYPE_CHECKING:
    from dfineseg.export.api import ExportPlan
    from dfineseg.export.parity_data import ParityData, Reference
    from dfineseg.export.publish import ArtefactRecord, ExportRun

Say = Callable[[str], None]


@dataclass
class ExportContext:
    plan: ExportPlan
    run: ExportRun
    say: Say
    scratch: Path  # intermediates never published (the twins): a temporary folder outside `out`
    metadata: dict[str, str]  # the plan's metadata, FP32 (`with_precision` for the others)
    # Where each artefact made so far is now: in the staging folder, then where its check put it. "onnx" is
    # the FP32 ONNX every format starts from, staged even when format=onnx was not asked for.
    made: dict[str, Path] = field(default_factory=dict)
    source: ArtefactRecord | None = None  # the FP32 ONNX's record (the onnx artefact, when asked for)
    data: ParityData | None = None  # parity images (and, with int8, its accuracy-control set)
    calib: list[np.ndarray] = field(default_factory=list)  # INT8 calibration images
    reference: Reference | None = None  # PyTorch's answers (parity on)
    twin: Path | None = None  # the FP32 pre-top-K twin ONNX (parity on), in `scratch`


@dataclass
class Built:
    """An artefact made in the staging folder, ready for its check."""

    record: ArtefactRecord
    opens: Path  # the file a runtime opens: the artefact, or the model file inside its folder
    twin: Forward | None = None  # its pre-top-K twin in the same precision (the raw check); None: not checked
    options: dict[str, Any] = field(default_factory=dict)  # backend options its check runs with
    # Called once it is settled (promoted, or kept aside as failed), with the record naming where it now is.
    settled: Callable[[ArtefactRecord], None] | None = None


def open_backend(path: Path, **options: Any) -> tuple[Forward, int | None, dict[str, Any]]:
    """The artefact opened the way users open it (the Predictor's backend), its fixed batch, and what runs."""
    from dfineseg.infer.backends import load_backend

    backend = load_backend(path, **options)
    r = backend.runtime
    runtime = {"backend": r.backend, "device": r.device, "precision": r.precision, "batch": r.batch, **r.extra}
    return backend.forward, r.batch, runtime


def ort_forward(path: Path) -> Forward:
    """A twin graph (outputs named as the twin names them) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    from dfineseg.infer.graph import INPUT_NAME

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {INPUT_NAME: batch})))

    return forward
