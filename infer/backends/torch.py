"""PyTorch backend: a training checkpoint run through the exported graph's module (`DeployModel`).

The only module under `dfineseg.infer` that imports torch, and only when a backend is opened, so an
edge install without torch can still import everything else. The checkpoint is opened and its
deployment settings derived by `dfineseg.model.model_file`; the forward pass is the shared PyTorch
runner (`dfineseg.model.runner`), the one validation and export's parity reference use too.
"""

from __future__ import annotations

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
from dfineseg.infer.backends._common import parse_device
from dfineseg.infer.graph import output_names
from dfineseg.infer.metadata import ModelInfo
from dfineseg.infer.postprocess import DEFAULT_NMS_IOU

_HALF = {"f16", "fp16", "half"}


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
        kind, index = parse_device(device, allowed=("cpu", "cuda", "auto"))
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device=cuda asked for, but this PyTorch has no CUDA GPU; use device=cpu")
        half = bool(half) or (precision is not None and str(precision).lower() in _HALF)
        if half and kind != "cuda":
            raise PredictorError("half precision with the PyTorch backend needs device=cuda (CPUs lack fp16 kernels)")
        if threads and kind == "cpu":
            torch.set_num_threads(int(threads))

        from dfineseg.model.model_file import load_model_file

        try:
            opened = load_model_file(Path(path))
        except UserError as exc:  # CheckpointError etc.: already a clear message; keep one error type
            raise ModelFileError(str(exc)) from None
        except Exception as exc:  # pickle/zip errors from a truncated or foreign file
            raise ModelFileError(
                f"{path}: not a readable dfineseg checkpoint ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        # topk=None: the K an export of this checkpoint would use, so both give the same detections
        info = opened.deploy_info(topk=topk)
        self._setup(opened.model, info, torch.device(kind if index is None else f"{kind}:{index}"), half, Path(path))

    @classmethod
    def from_model(cls, model: Any, info: ModelInfo, device: Any = "cpu", path: str | Path = "<in memory>") -> TorchBackend:
        """A backend over a model already in memory (the trainer's EMA model, a checkpoint opened by the caller)."""
        import torch

        backend = cls.__new__(cls)
        backend._setup(model, info, torch.device(device), False, Path(str(path)))
        return backend

    def _setup(self, model: Any, info: ModelInfo, device: Any, half: bool, path: Path) -> None:
        import torch

        from dfineseg.model.runner import graph_forward

        self.path = path
        self.device = device
        self.half = half
        self.topk = int(info.topk)
        self.output_names = output_names(info.task)
        self._forward = graph_forward(model, info.task, self.topk, device, half)
        self.metadata = info.to_metadata()
        self.runtime = RuntimeInfo(
            backend=self.name,
            device=str(device),
            precision="fp16" if half else "fp32",
            batch=None,
            input_hw=tuple(info.imgsz),
            extra={"torch": torch.__version__},
        )

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self._forward(self._check_batch(batch))


def open_backend(path: Path, **options: Any) -> TorchBackend:
    return TorchBackend(path, **options)


def model_predictor(
    model: Any, info: ModelInfo, device: Any = "cpu", conf: float | None = None,
    nms_iou: float | None = DEFAULT_NMS_IOU,
    class_conf: Any = None, batch_size: int | None = None,
) -> Any:
    """`predict(images) -> list[Detections]` for a model in memory, through the Predictor (the shared
    preprocess, batching and postprocess every exported backend uses): training-time validation and
    `dfineseg val` on a checkpoint score exactly what deployment would return.

    info: the deployment settings (`dfineseg.model.model_file.deploy_info`); conf defaults to info.conf.
    """
    from dfineseg.infer.predictor import Predictor

    backend = TorchBackend.from_model(model, info, device)
    predictor = Predictor(backend, info, conf=conf, class_conf=class_conf, nms_iou=nms_iou, batch_size=batch_size)
    return predictor.predict_batch
