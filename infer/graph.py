"""The exported graph's contract: its input name and its output names, in one place.

Export writes these names into every artefact, the backends look them up, post-processing and parity
read the outputs by them, and the PyTorch runner (`dfineseg.model.runner`) returns them, so the PyTorch
model and every exported file hand over the same dictionary. Torch-free: the edge install reads it too.

Segment models hand over their masks factored: per-pixel features at 1/4 of the input (NHWC) and one
embedding per detection, with ``mask logit = embedding . feature``. The product is taken afterwards in
the shared post-processing, only for the detections it keeps and only inside their boxes. In the graph it
was the largest float operation of an INT8 model (a [K,C] x [C,H/4*W/4] MatMul that OpenVINO's CPU runs
in f32 even with both inputs quantised, ~10 MB of output per image): docs/BENCHMARKS.md, "Masks out of
the graph". NHWC because OpenVINO computes INT8 convolutions in that layout (NCHW costs a reorder).
Files exported before that (metadata schema 1) have one ``mask_logits`` [B,K,H/4,W/4] output instead;
they still load and give the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable

INPUT_NAME = "images"
MASK_FEATURES = "mask_features"  # [B, H/4, W/4, C] float32
MASK_EMBED = "mask_embed"  # [B, K, C] float32: logit of detection k at a pixel = mask_embed[k] . mask_features[pixel]
MASK_LOGITS = "mask_logits"  # schema-1 files: [B, K, H/4, W/4] float32
# What a detection graph returns; a segmentation graph adds the mask outputs. Order = the graph's output order.
DETECTION_OUTPUTS = ("scores", "labels", "boxes")
MASK_OUTPUTS = (MASK_FEATURES, MASK_EMBED)
OUTPUT_NAMES = (*DETECTION_OUTPUTS, *MASK_OUTPUTS)
# Every output name a backend maps, today's and those of older files.
KNOWN_OUTPUTS = (*OUTPUT_NAMES, MASK_LOGITS)
# The parity twin: every query's class logits and cxcywh boxes before top-K (export/onnx_export.RawOutputs).
RAW_NAMES = ("logits", "boxes_cxcywh")


def output_names(task: str) -> tuple[str, ...]:
    """The graph's outputs for a task ("segment" adds the mask features and embeddings)."""
    return OUTPUT_NAMES if task == "segment" else DETECTION_OUTPUTS


def has_masks(names: Iterable[str]) -> bool:
    """Whether a graph with these outputs gives masks (today's factored pair or an older file's logits)."""
    names = set(names)
    return MASK_LOGITS in names or all(n in names for n in MASK_OUTPUTS)
