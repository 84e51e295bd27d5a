"""`Predictor`: one API over every model file (checkpoint, ONNX, OpenVINO IR, TensorRT engine).

`Predictor.load(path)` picks the backend from the file, reads the metadata stored at export (class
names, dataset category ids, input size, resize mode, default threshold, task) and refuses files from a
newer metadata schema. `predict` runs the shared `preprocess` -> backend `forward` -> shared
`postprocess`, so every backend, training-time validation and the benchmark see the same pixels and
the same post-processing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.backends import (
    Backend,
    BackendUnavailableError,
    ModelFileError,
    PredictorError,
    RuntimeInfo,
    load_backend,
)
from dfineseg.infer.batching import pad_batch, run_images
from dfineseg.infer.detections import Detections
from dfineseg.infer.graph import MASK_OUTPUTS, OUTPUT_NAMES, has_masks
from dfineseg.infer.metadata import ModelInfo
from dfineseg.infer.postprocess import DEFAULT_NMS_IOU, postprocess
from dfineseg.infer.preprocess import preprocess

__all__ = ["BackendUnavailableError", "InputImageError", "ModelFileError", "Predictor", "PredictorError"]


class InputImageError(PredictorError):
    """What was passed to `predict` is not a usable image (None, a missing path, an empty or odd array)."""


DEFAULT_BATCH = 8  # images per forward for dynamic-batch models (memory stays small at 640x640)


class _ExternalBackend(Backend):
    """Wraps any object with `forward(batch) -> outputs dict` (e.g. a peer model runner) as a Backend."""

    name = "external"

    def __init__(self, runner: Any, imgsz: tuple[int, int], metadata: dict[str, str]) -> None:
        self.runner = runner
        self.path = Path(str(getattr(runner, "path", "external")))
        self.metadata = metadata
        self.output_names = OUTPUT_NAMES
        self.runtime = getattr(runner, "runtime", None) or RuntimeInfo(
            backend=str(getattr(runner, "backend_name", type(runner).__name__)),
            device=str(getattr(runner, "device", "cpu")),
            precision=str(getattr(runner, "precision", "fp32")),
            batch=getattr(runner, "batch", None),
            input_hw=(int(imgsz[0]), int(imgsz[1])),
        )

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.forward(batch)

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if callable(close):
            close()


class Predictor:
    """Run a dfineseg model on RGB uint8 images (HxWx3; gray, RGBA and 16-bit arrays are converted)."""

    def __init__(
        self,
        backend: Backend,
        info: ModelInfo,
        conf: float | None = None,
        class_conf: Mapping[int, float] | None = None,
        nms_iou: float | None = DEFAULT_NMS_IOU,
        max_det: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.backend = backend
        self.info = info
        self.conf = float(info.conf if conf is None else conf)
        self.class_conf = dict(class_conf) if class_conf else None
        self.nms_iou = nms_iou
        self.max_det = max_det
        self.batch_size = batch_size
        _check_conf(self.conf)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        conf: float | None = None,
        precision: str | None = None,
        threads: int | None = None,
        backend: str | None = None,
        class_conf: Mapping[int, float] | None = None,
        nms_iou: float | None = DEFAULT_NMS_IOU,
        max_det: int | None = None,
        batch_size: int | None = None,
        **backend_options: Any,
    ) -> Predictor:
        """Open a model file.

        path: `.pt` checkpoint (PyTorch), `.onnx` (ONNX Runtime), `.xml` or a folder holding one
        (OpenVINO), `.engine` (TensorRT). device: `cpu`, `cuda[:N]`, `auto`; OpenVINO also `gpu`, `npu`;
        ONNX Runtime also `tensorrt`. conf: score threshold (default: the one stored in the model).
        precision: OpenVINO inference precision `f32`/`f16`/`bf16` (default: the device's own), PyTorch
        `fp16` (CUDA only). threads: CPU threads. Further options go to the backend (OpenVINO:
        `performance="latency"|"throughput"`, `num_requests`; PyTorch: `half`, `topk`).
        """
        be = load_backend(path, backend=backend, device=device, precision=precision, threads=threads, **backend_options)
        try:
            info = be.info
        except ModelFileError:
            be.close()
            raise
        if info.task == "segment" and not has_masks(be.output_names):
            be.close()
            raise ModelFileError(
                f"{be.path}: metadata says task=segment but the graph has no mask outputs ({', '.join(MASK_OUTPUTS)}); "
                f"it has {list(be.output_names)}: export it again with `dfineseg export`"
            )
        if tuple(be.runtime.input_hw) != tuple(info.imgsz):
            # the graph is the authority on what it accepts; the metadata only describes it
            info = replace(info, imgsz=tuple(be.runtime.input_hw))
        return cls(be, info, conf=conf, class_conf=class_conf, nms_iou=nms_iou, max_det=max_det, batch_size=batch_size)

    @classmethod
    def from_backend(
        cls,
        runner: Any,
        names: Sequence[str] | None = None,
        resize: str = "stretch",
        imgsz: Sequence[int] | None = None,
        conf: float = 0.5,
        category_ids: Sequence[int] | None = None,
        task: str = "segment",
        **kwargs: Any,
    ) -> Predictor:
        """Wrap any object with `forward(batch) -> graph outputs` (a peer model, a custom runtime)."""
        hw = tuple(imgsz or getattr(runner, "input_hw", None) or ())
        if len(hw) != 2:
            raise PredictorError("from_backend needs imgsz=(H, W) or a runner with an `input_hw` attribute")
        backend = runner if isinstance(runner, Backend) else _ExternalBackend(runner, hw, {})
        names = list(names or [])
        info = ModelInfo(
            names=names,
            category_ids=list(category_ids) if category_ids is not None else list(range(len(names))),
            imgsz=(int(hw[0]), int(hw[1])),
            resize=resize,
            conf=float(conf),
            task=task,
            precision=backend.runtime.precision,
        )
        return cls(backend, info, conf=conf, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> list[str]:
        return self.info.names

    @property
    def category_ids(self) -> list[int]:
        return self.info.category_ids

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def metadata(self) -> dict[str, str]:
        """The raw str -> str map stored in the model file (see `dfineseg.infer.metadata`)."""
        return dict(self.backend.metadata)

    @property
    def runtime(self) -> RuntimeInfo:
        return self.backend.runtime

    def chunk_size(self, n: int) -> int:
        """How many images go through one forward: the graph's fixed batch, else batch_size (or the default)."""
        rt = self.backend.runtime
        if rt.batch is not None:
            return rt.batch
        size = self.batch_size or DEFAULT_BATCH
        if rt.max_batch is not None:
            size = min(size, rt.max_batch)
        return max(1, min(size, n))

    # ------------------------------------------------------------------ inference
    def predict(
        self, source: np.ndarray | str | Path | Sequence[np.ndarray | str | Path], conf: float | None = None
    ) -> Detections | list[Detections]:
        """One image (array or file path) -> Detections; a list of them -> list[Detections], in order."""
        if isinstance(source, np.ndarray) and source.ndim == 4:
            raise PredictorError(
                "predict takes HxWxC images (or a list of them), not a 4-D batch; preprocessed batches go to "
                "predictor.backend.forward"
            )
        single = source is None or isinstance(source, np.ndarray | str | Path)
        if single:
            items = [source]
        elif isinstance(source, Iterable) and not isinstance(source, bytes | bytearray | Mapping):
            items = list(source)
        else:
            raise InputImageError(
                f"predict takes a numpy image (HxWx3 RGB), an image path or a list of them, got {type(source).__name__}"
            )
        images = [self._as_image(x, None if single else i) for i, x in enumerate(items)]
        results = self.predict_batch(images, conf=conf)
        return results[0] if single else results

    def predict_batch(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[Detections]:
        if not len(images):
            return []
        images = [self._as_image(im, i) for i, im in enumerate(images)]  # None, paths, odd types
        thr = self.conf if conf is None else float(conf)
        _check_conf(thr)
        out: list[Detections] = []
        step = self.chunk_size(len(images))
        for outputs, metas in run_images(self.backend.forward, images, self._preprocess, step, self.backend.runtime.batch):
            out.extend(self._postprocess(outputs, metas, thr))
        return out

    def stream(
        self, items: Iterable[tuple[Any, np.ndarray]], conf: float | None = None
    ) -> Iterator[tuple[Any, np.ndarray, Detections]]:
        """(key, image) pairs -> (key, image, Detections), one image per forward, in order.

        For video: OpenVINO keeps several asynchronous requests in flight, so frame i+1 is computed while
        frame i is post-processed and drawn; other backends run the frames one after the other.
        """
        thr = self.conf if conf is None else float(conf)
        _check_conf(thr)

        def batches() -> Iterator[tuple[np.ndarray, Any]]:
            for key, image in items:
                batch, metas = self._preprocess([image])
                yield pad_batch(batch, self.backend.runtime.batch), (key, image, metas)

        for outputs, (key, image, metas) in self.backend.forward_stream(batches()):
            yield key, image, self._postprocess(outputs, metas, thr)[0]

    def predict_tiled(self, image: np.ndarray | str | Path, tile: int, overlap: float = 0.2,
                      conf: float | None = None) -> Detections:
        """One image in overlapping `tile`-pixel windows plus the whole image, merged (see infer/tiling.py):
        small objects on large images keep their size at the model's input."""
        from dfineseg.infer.tiling import predict_tiled

        return predict_tiled(self, self._as_image(image), tile, overlap, conf)

    def track(
        self, items: Iterable[tuple[Any, np.ndarray]] | str | Path, tracker: Any = None
    ) -> Iterator[tuple[Any, np.ndarray, Detections, np.ndarray]]:
        """Frames in order -> (key, image, tracked Detections, their track ids), ByteTrack style
        (`dfineseg.infer.track.Tracker`; default `Tracker.from_conf(self.conf)`).

        `items` are (key, image) pairs, or a video / folder / stream to open (keys are then its `Frame`s).
        The model runs at the tracker's low threshold: weak detections keep occluded objects tracked; only
        detections that belong to a confirmed track are returned.
        """
        from dfineseg.infer.track import Tracker

        tracker = tracker if tracker is not None else Tracker.from_conf(self.conf)
        if isinstance(items, str | Path):
            from dfineseg.infer.io import open_source

            source = open_source(items)
            items = ((frame, frame.image) for frame in source)
        for key, image, det in self.stream(items, conf=tracker.low):
            ids = tracker.update(det)
            keep = ids > 0
            yield key, image, det[keep], ids[keep]

    # ------------------------------------------------------------------ steps
    def _as_image(self, item: Any, index: int | None = None) -> np.ndarray:
        where = "" if index is None else f" (item {index} of the list)"
        if item is None:
            raise InputImageError(
                f"predict got None instead of an image{where}: cv2.imread (and read functions like it) return None "
                "for a missing or unreadable file; check the path, or pass the path itself to predict"
            )
        if isinstance(item, np.ndarray):
            return item  # shape, size and dtype are checked once, by the shared preprocess (to_rgb_uint8)
        if isinstance(item, str | Path):
            from dfineseg.infer.io import read_image

            return read_image(Path(item).expanduser())  # ImageReadError names the file (missing, unreadable)
        raise InputImageError(
            f"predict takes numpy images (HxWx3 RGB uint8) or image paths, got {type(item).__name__}{where}"
        )

    def _preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list]:
        try:
            return preprocess(list(images), self.info.imgsz, self.info.resize)
        except (TypeError, ValueError) as exc:  # to_rgb_uint8: shape, emptiness, dtype, float range
            raise InputImageError(f"cannot use this image: {exc}") from None

    def _postprocess(self, outputs: dict[str, np.ndarray], metas: list, conf: float) -> list[Detections]:
        n = len(metas)
        trimmed = {k: v[:n] for k, v in outputs.items()}
        return postprocess(
            trimmed, metas, conf=conf, class_conf=self.class_conf, nms_iou=self.nms_iou, max_det=self.max_det
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        rt = self.backend.runtime
        return (
            f"Predictor({self.backend.path}, backend={rt.backend}, device={rt.device}, precision={rt.precision}, "
            f"task={self.info.task}, classes={len(self.info.names)}, imgsz={list(self.info.imgsz)}, conf={self.conf})"
        )


def _check_conf(conf: float) -> None:
    if not 0.0 <= conf <= 1.0:
        raise PredictorError(f"conf must lie in 0..1, got {conf}")
