"""PyTorch backend: a training checkpoint run through `DeployModel`, the same graph that export traces.

The only module under `dfineseg.infer` that imports torch, and only when a backend is opened, so an
edge install without torch can still import everything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.backends import (
    Backend,
    BackendUnavailableError,
    ModelFileError,
    PredictorError,
    RuntimeInfo,
    UserError,
    import_runtime,
)
from dfineseg.infer.backends._common import metadata_imgsz, parse_device

_HALF = {"f16", "fp16", "half"}


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def checkpoint_metadata(info: Any, topk: int, task: str) -> dict[str, str]:
    """The metadata map an export of this checkpoint would carry (same keys as ONNX metadata_props)."""
    config = _get(info, "config") or {}
    data = _get(config, "data") or {}
    evaluation = _get(config, "eval") or {}
    imgsz = _get(info, "imgsz") or _get(data, "imgsz") or (640, 640)
    if isinstance(imgsz, int):
        imgsz = (imgsz, imgsz)
    names = list(_get(info, "names") or [])
    category_ids = _get(info, "category_ids")
    return {
        "dfineseg_schema": "1",
        "dfineseg_version": str(_get(info, "dfineseg_version") or ""),
        "task": task,
        "names": json.dumps(names),
        "category_ids": json.dumps(list(category_ids) if category_ids is not None else list(range(len(names)))),
        "imgsz": json.dumps([int(imgsz[0]), int(imgsz[1])]),
        "resize": str(_get(info, "resize") or _get(data, "resize") or "stretch"),
        "conf": json.dumps(float(_get(evaluation, "conf", 0.5) if _get(info, "conf") is None else _get(info, "conf"))),
        "topk": json.dumps(int(topk)),
        "precision": "fp32",
    }


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        precision: str | None = None,
        half: bool = False,
        topk: int | None = None,
        threads: int | None = None,
        **_: Any,
    ) -> None:
        torch = import_runtime("torch", "torch")
        self._torch = torch
        self.path = Path(path)
        kind, index = parse_device(device, allowed=("cpu", "cuda", "auto"))
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device=cuda asked for, but this PyTorch has no CUDA GPU; use device=cpu")
        self.device = torch.device(kind if index is None else f"{kind}:{index}")
        self.half = bool(half) or (precision is not None and str(precision).lower() in _HALF)
        if self.half and kind != "cuda":
            raise PredictorError("half precision with the PyTorch backend needs device=cuda (CPUs lack fp16 kernels)")
        if threads and kind == "cpu":
            torch.set_num_threads(int(threads))

        from dfineseg.model.dfine import DeployModel
        from dfineseg.train.checkpoint import load_model_from_checkpoint

        try:
            model, info = load_model_from_checkpoint(self.path)
        except UserError as exc:  # CheckpointError etc.: already a clear message; keep one error type
            raise ModelFileError(str(exc)) from None
        except Exception as exc:  # pickle/zip errors from a truncated or foreign file
            raise ModelFileError(
                f"{self.path}: not a readable dfineseg checkpoint ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        task = _get(info, "task") or ("segment" if getattr(model, "mask_head", None) is not None else "detect")
        # the same K an export of this checkpoint would use, so both give the same detections
        self.topk = int(topk or _get(_get(_get(info, "config"), "export"), "topk") or 100)
        self.model = DeployModel(model, topk=self.topk).eval().to(self.device)
        if self.half:
            self.model = self.model.half()
        self.metadata = checkpoint_metadata(info, self.topk, task)
        self.output_names = ("scores", "labels", "boxes", "mask_logits") if task == "segment" else ("scores", "labels", "boxes")
        self.runtime = RuntimeInfo(
            backend=self.name,
            device=str(self.device),
            precision="fp16" if self.half else "fp32",
            batch=None,
            input_hw=metadata_imgsz(self.metadata) or (640, 640),
            extra={"torch": torch.__version__},
        )

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        batch = self._check_batch(batch)
        x = torch.from_numpy(batch).to(self.device)
        if self.half:
            x = x.half()
        with torch.inference_mode():
            outs = self.model(x)
        if isinstance(outs, dict):
            outs = tuple(outs[n] for n in self.output_names)
        return {
            name: (t.float() if t.is_floating_point() else t).cpu().numpy() for name, t in zip(self.output_names, outs)
        }


def open_backend(path: Path, **options: Any) -> TorchBackend:
    return TorchBackend(path, **options)
