"""Runner for Ultralytics YOLO segmentation models a user exported themselves (ONNX or OpenVINO).

Ultralytics is never a dependency: this reads the exported graph directly. The end-to-end (NMS-free)
segment head of YOLO26 exports two outputs:

- detections (B, K, 6 + M): x1, y1, x2, y2 in input pixels, score, class, M mask coefficients
- prototypes (B, M, H/4, W/4)

Mask logits of detection k are `coeffs_k . prototypes`, which is exactly our exported-graph contract
(`mask_logits` at 1/4 of the input), so the peer goes through the same `postprocess` and the same metric
code as our own models, with the same letterbox resizing that Ultralytics' predictor uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.errors import UserError
from dfineseg.infer.graph import MASK_LOGITS


class PeerModelError(UserError):
    pass


class YoloSegRunner:
    """`forward(batch)` returns our graph outputs; `resize` is letterbox as in Ultralytics."""

    resize = "letterbox"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise PeerModelError(f"peer model not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            inp = self._session.get_inputs()[0]
            self._input_name = inp.name
            shape = inp.shape
            self._run = lambda x: self._session.run(None, {self._input_name: x})
            self.backend_name, self.precision = "onnxruntime", "f32"
        elif suffix == ".xml":
            import openvino as ov

            core = ov.Core()
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = core.compile_model(str(self.path), "CPU", config)
            self._request = compiled.create_infer_request()
            shape = list(compiled.inputs[0].get_partial_shape().to_shape())
            self._run = lambda x: [self._request.infer({0: x})[out] for out in compiled.outputs]
            self.backend_name, self.precision = "openvino", str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        else:
            raise PeerModelError(f"{self.path}: peer models must be .onnx or OpenVINO .xml")
        try:
            self.input_hw = (int(shape[2]), int(shape[3]))
        except (TypeError, ValueError):
            raise PeerModelError(f"{self.path}: export the peer with a static input size (got {shape})") from None

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        return yolo_end_to_end_to_contract(outputs, self.input_hw, self.path)


def yolo_end_to_end_to_contract(outputs: list[np.ndarray], input_hw: tuple[int, int], path: Path | str = "peer") -> dict[str, np.ndarray]:
    """(detections (B,K,6+M), prototypes (B,M,h,w)) -> scores, labels, boxes (normalised xyxy), mask_logits."""
    dets = next((o for o in outputs if o.ndim == 3), None)
    protos = next((o for o in outputs if o.ndim == 4), None)
    if dets is None or dets.shape[-1] < 6:
        raise PeerModelError(
            f"{path}: expected an end-to-end YOLO output (B, K, 6+M); got shapes {[o.shape for o in outputs]}. "
            "Export the Ultralytics model with its end-to-end (NMS-free) head"
        )
    h, w = input_hw
    boxes = dets[..., :4] / np.array([w, h, w, h], dtype=np.float32)
    out = {
        "scores": dets[..., 4].astype(np.float32),
        "labels": dets[..., 5].astype(np.int64),
        "boxes": boxes.astype(np.float32),
    }
    if protos is not None:
        coeffs = dets[..., 6:]
        b, m, ph, pw = protos.shape
        if coeffs.shape[-1] != m:
            raise PeerModelError(f"{path}: {coeffs.shape[-1]} mask coefficients but {m} prototypes")
        out[MASK_LOGITS] = np.einsum("bkm,bmhw->bkhw", coeffs, protos).astype(np.float32)
    return out
