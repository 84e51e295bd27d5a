"""What parity compares against: the images it runs on (`ParityData`) and PyTorch's answers on them
(`Reference`, computed once per export and shared by every artefact's check), and the loop that runs any
forward function over those images the way the Predictor does (`dfineseg.infer.batching`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dfineseg.export.errors import ParityError
from dfineseg.export.tolerances import NOISE_DRAWS
from dfineseg.infer.batching import run_images
from dfineseg.infer.detections import Detections
from dfineseg.infer.graph import RAW_NAMES
from dfineseg.infer.postprocess import postprocess
from dfineseg.infer.preprocess import preprocess

Forward = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class ParityData:
    """The images parity runs on: validation images with ground truth, or generated ones without."""

    images: list[np.ndarray]
    ground_truth: list[Any] | None
    source: str
    imgsz: tuple[int, int]
    resize: str
    task: str
    conf: float
    iou_thr: float = 0.5
    n_raw: int = 8  # images used for the raw/outputs/detections checks (the F1 check uses all)
    batch: int = 4
    # The post-processing `val`, `bench` and `infer` apply (eval.nms_iou), so the F1 an export reports is the
    # F1 users get; None: no NMS.
    nms_iou: float | None = None

    @property
    def raw_images(self) -> list[np.ndarray]:
        return self.images[: self.n_raw]


def iter_outputs(
    forward: Forward, images: Sequence[np.ndarray], data: ParityData, fixed_batch: int | None
) -> Iterator[tuple[dict[str, np.ndarray], list[Any]]]:
    def prepare(group: list[np.ndarray]) -> tuple[np.ndarray, list[Any]]:
        return preprocess(group, data.imgsz, data.resize)

    yield from run_images(forward, images, prepare, fixed_batch or data.batch, fixed_batch)


def collect_outputs(forward: Forward, images: Sequence[np.ndarray], data: ParityData, fixed_batch: int | None):
    outs, metas = [], []
    for out, m in iter_outputs(forward, images, data, fixed_batch):
        outs.append(out)
        metas.extend(m)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}, metas


def detections_for(forward: Forward, data: ParityData, fixed_batch: int | None, images=None) -> list[Detections]:
    dets: list[Detections] = []
    for out, metas in iter_outputs(forward, data.images if images is None else images, data, fixed_batch):
        dets.extend(postprocess(out, metas, conf=data.conf, nms_iou=data.nms_iou))
    return dets


@dataclass
class Reference:
    """PyTorch's answers, computed once per export run and shared by every artefact's parity."""

    outputs: dict[str, np.ndarray]  # DeployModel outputs on data.raw_images
    metas: list[Any]
    raw: dict[str, np.ndarray] | None  # twin outputs (all queries) on data.raw_images
    detections: list[Detections]  # on all images, at data.conf
    f1: dict[str, float] | None
    seconds: float
    # PyTorch again on perturbed input: perturb(amplitude, seed); run on first use, kept per amplitude
    perturb: Callable[[float, int], Reference] | None = field(default=None, repr=False)
    _perturbed: dict[float, list[Reference]] = field(default_factory=dict, repr=False)

    def perturbed(self, amplitude: float) -> list[Reference]:
        if amplitude not in self._perturbed:
            perturb = self.perturb
            self._perturbed[amplitude] = [perturb(amplitude, seed) for seed in range(NOISE_DRAWS)] if perturb else []
        return self._perturbed[amplitude]


def outcome_of(detections: Sequence[Detections], data: ParityData) -> Any | None:
    """The paper's counts at the evaluation threshold (`infer.metrics.Outcome`: totals and each image's), from
    one matching pass; None without ground truth."""
    if data.ground_truth is None:
        return None
    from dfineseg.infer.metrics import PaperMetrics

    return PaperMetrics(detections, data.ground_truth, data.task, iou_thr=data.iou_thr).outcome(data.conf)


def f1_of(detections: Sequence[Detections], data: ParityData) -> dict[str, float] | None:
    outcome = outcome_of(detections, data)
    return None if outcome is None else {k: float(v) for k, v in outcome.summary().items()}


def image_counts(detections: Sequence[Detections], data: ParityData) -> np.ndarray | None:
    """Each validation image's tp, fp, fn at the evaluation threshold, (images, 3); None without ground truth."""
    outcome = outcome_of(detections, data)
    return None if outcome is None else outcome.image_counts


def perturbed_input(forward: Forward, amplitude: float, seed: int = 0) -> Forward:
    """`forward` on its input plus uniform noise in [-amplitude, amplitude], the same for the same shape and seed."""

    def noisy(batch: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, *batch.shape])
        noise = rng.uniform(-amplitude, amplitude, size=batch.shape).astype(batch.dtype)
        return forward(batch + noise)

    return noisy


def torch_reference(
    deploy: Any, raw_module: Any | None, data: ParityData, output_names: Sequence[str], amplitude: float = 0.0,
    seed: int = 0,
) -> Reference:
    t0 = time.perf_counter()
    from dfineseg.model.runner import module_forward

    fwd = module_forward(deploy, output_names)
    raw_fwd = module_forward(raw_module, RAW_NAMES) if raw_module is not None else None
    if amplitude:
        fwd = perturbed_input(fwd, amplitude, seed)
        raw_fwd = perturbed_input(raw_fwd, amplitude, seed) if raw_fwd is not None else None
    outputs, metas = collect_outputs(fwd, data.raw_images, data, None)
    raw = collect_outputs(raw_fwd, data.raw_images, data, None)[0] if raw_fwd is not None else None
    bad = non_finite({**outputs, **(raw or {})})
    if bad:
        raise ParityError(
            "parity check 'reference': PyTorch reference outputs are not finite "
            f"({', '.join(f'{k}: {n} NaN/Inf' for k, n in bad.items())}): the checkpoint's weights contain NaN/Inf "
            "(training diverged) or the model overflows; nothing can be compared with them. Export an earlier "
            "checkpoint, or retrain with a lower learning rate"
        )
    dets = detections_for(fwd, data, None)
    perturb = None if amplitude else (
        lambda noise, draw: torch_reference(deploy, raw_module, data, output_names, noise, draw))
    return Reference(outputs, metas, raw, dets, f1_of(dets, data), time.perf_counter() - t0, perturb)


def non_finite(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """Count of NaN/Inf values per floating-point output (only those that have any)."""
    counts = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            n = int((~np.isfinite(value)).sum())
            if n:
                counts[name] = n
    return counts
