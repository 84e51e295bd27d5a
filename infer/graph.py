"""The exported graph's contract: its input name and its output names, in one place.

Export writes these names into every artefact, the backends look them up, post-processing and parity
read the outputs by them, and the PyTorch runner (`dfineseg.model.runner`) returns them, so the PyTorch
model and every exported file hand over the same dictionary. Torch-free: the edge install reads it too.
"""

from __future__ import annotations

INPUT_NAME = "images"
MASK_LOGITS = "mask_logits"
# What a detection graph returns; a segmentation graph adds MASK_LOGITS. Order = the graph's output order.
DETECTION_OUTPUTS = ("scores", "labels", "boxes")
OUTPUT_NAMES = (*DETECTION_OUTPUTS, MASK_LOGITS)
# The parity twin: every query's class logits and cxcywh boxes before top-K (export/onnx_export.RawOutputs).
RAW_NAMES = ("logits", "boxes_cxcywh")


def output_names(task: str) -> tuple[str, ...]:
    """The graph's outputs for a task ("segment" adds mask logits)."""
    return OUTPUT_NAMES if task == "segment" else DETECTION_OUTPUTS
