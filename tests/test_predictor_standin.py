"""A tiny stand-in model that follows the exported-graph contract, and the files made from it.

Used by the predictor/backend/io/CLI tests so they run in seconds: a hand-made torch module whose
outputs depend on the image content (bright coloured blocks become confident detections with masks),
exported by torch.onnx.export with the dfineseg metadata, then converted to OpenVINO IR. The tests
here check that the stand-in really honours the contract, so the other tests test the runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAMES = ["red", "green", "blue"]
CATEGORY_IDS = [3, 7, 11]  # deliberately not 0..C-1: sinks must write the dataset's ids
IMGSZ = (64, 96)
GRID = (2, 3)  # one query per grid cell -> K = 6


SEGMENT_OUTPUTS = ("scores", "labels", "boxes", "mask_features", "mask_embed")
LEGACY_SEGMENT_OUTPUTS = ("scores", "labels", "boxes", "mask_logits")  # metadata schema 1


def make_module(task: str = "segment", legacy: bool = False):
    """Graph contract: images [B,3,H,W] -> scores [B,K], labels int64 [B,K], boxes [B,K,4] xyxy
    normalised, (segment) mask_features [B,H/4,W/4,2] + mask_embed [B,K,2], or with `legacy` (a schema-1
    file) mask_logits [B,K,H/4,W/4]; both give the same logits."""
    import torch
    from torch import nn

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            gh, gw = GRID
            cells = []
            for r in range(gh):
                for c in range(gw):
                    cells.append([c / gw + 0.02, r / gh + 0.03, (c + 1) / gw - 0.03, (r + 1) / gh - 0.02])
            self.register_buffer("cells", torch.tensor(cells, dtype=torch.float32))

        def forward(self, images):
            pooled = nn.functional.adaptive_avg_pool2d(images, GRID)  # [B,3,gh,gw]
            per_cell = pooled.flatten(2).transpose(1, 2)  # [B,K,3]
            best, labels = per_cell.max(-1)
            scores = torch.sigmoid(12.0 * (best - 0.25))
            # content-dependent shrink so boxes differ per image (and per backend if one got it wrong)
            shrink = 0.05 * per_cell.mean(-1, keepdim=True)
            boxes = self.cells.unsqueeze(0) + torch.cat([shrink, shrink, -shrink, -shrink], -1)
            if task == "detect":
                return scores, labels, boxes
            quarter = nn.functional.avg_pool2d(images, 4)  # [B,3,H/4,W/4]
            logits = 10.0 * (quarter.amax(1, keepdim=True) - 0.5)
            if legacy:
                masks = logits.expand(-1, boxes.shape[1], -1, -1) + 0.0 * scores[..., None, None]
                return scores, labels, boxes, masks
            # feature channels (logit map, its negation); each detection's embedding picks the first
            features = torch.cat([logits, -logits], 1).permute(0, 2, 3, 1)
            embed = torch.stack([torch.ones_like(scores), torch.zeros_like(scores)], -1)
            return scores, labels, boxes, features, embed

    return StandIn().eval()


def metadata(task: str = "segment", conf: float = 0.5, schema: int = 2, resize: str = "stretch") -> dict[str, str]:
    return {
        "dfineseg_schema": str(schema),
        "dfineseg_version": "0.1.0",
        "task": task,
        "names": json.dumps(NAMES),
        "category_ids": json.dumps(CATEGORY_IDS),
        "imgsz": json.dumps(list(IMGSZ)),
        "resize": resize,
        "conf": repr(conf),
        "topk": str(GRID[0] * GRID[1]),
        "precision": "fp32",
    }


def export_onnx(path: Path, task: str = "segment", batch: int | None = None, meta: dict | None = None,
                legacy: bool = False) -> Path:
    """batch=None: dynamic batch; an int: that fixed batch. legacy: a schema-1 file (mask_logits)."""
    import warnings

    import onnx
    import torch

    module = make_module(task, legacy)
    names = list(SEGMENT_OUTPUTS if not legacy else LEGACY_SEGMENT_OUTPUTS) if task == "segment" else ["scores", "labels", "boxes"]
    dynamic = None if batch else {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.rand(batch or 1, 3, *IMGSZ),), str(path), input_names=["images"], output_names=names,
            dynamic_axes=dynamic, opset_version=17, dynamo=False,
        )
    proto = onnx.load(str(path))
    for key, value in (meta if meta is not None else metadata(task, schema=1 if legacy else 2)).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def convert_openvino(onnx_path: Path, xml_path: Path) -> Path:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


class TorchRunner:
    """The stand-in in eager PyTorch behind `forward(batch)`: the reference every backend must match."""

    backend_name, precision, path = "torch", "fp32", "standin"

    def __init__(self, task: str = "segment") -> None:
        self.module = make_module(task)
        self.task = task
        self.input_hw = IMGSZ

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            outs = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        return {n: o.numpy() for n, o in zip(SEGMENT_OUTPUTS, outs)}


def torch_reference(task: str = "segment", conf: float = 0.5):
    from dfineseg.infer.predictor import Predictor

    return Predictor.from_backend(
        TorchRunner(task), names=NAMES, resize="stretch", imgsz=IMGSZ, conf=conf, category_ids=CATEGORY_IDS, task=task
    )


def scene(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A dark RGB image with a few saturated blocks: the stand-in detects the blocks' grid cells."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    for _ in range(3):
        ch = int(rng.integers(0, 3))
        y0, x0 = int(rng.integers(0, h - h // 3)), int(rng.integers(0, w - w // 3))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3, ch] = 255
    return img


@dataclass
class StandInFiles:
    root: Path
    onnx: Path
    onnx_detect: Path
    onnx_batch2: Path
    openvino: Path


def build_standin_files(root: Path) -> StandInFiles:
    """Export the stand-in in every form the tests load (conftest.py's session fixture `standin_files`)."""
    onnx_path = export_onnx(root / "model.onnx")
    ov_dir = root / "openvino"
    ov_dir.mkdir()
    return StandInFiles(
        root=root,
        onnx=onnx_path,
        onnx_detect=export_onnx(root / "detect.onnx", task="detect"),
        onnx_batch2=export_onnx(root / "batch2.onnx", batch=2),
        openvino=convert_openvino(onnx_path, ov_dir / "model.xml"),
    )


# ----------------------------------------------------------------------------- the stand-in's own contract
def test_standin_follows_the_graph_contract():
    import torch

    from dfineseg.infer.preprocess import preprocess

    batch, _ = preprocess([scene(0), scene(1)], IMGSZ)
    scores, labels, boxes, features, embed = make_module()(torch.from_numpy(batch))
    k = GRID[0] * GRID[1]
    assert scores.shape == (2, k) and labels.dtype == torch.int64 and boxes.shape == (2, k, 4)
    assert features.shape == (2, IMGSZ[0] // 4, IMGSZ[1] // 4, 2) and embed.shape == (2, k, 2)
    masks = torch.einsum("bkc,bhwc->bkhw", embed, features)
    legacy = make_module(legacy=True)(torch.from_numpy(batch))
    torch.testing.assert_close(masks, legacy[3])  # the schema-1 form gives the same logits
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    # content matters: the two scenes do not give the same scores, and some cells are confident
    assert not torch.allclose(scores[0], scores[1])
    assert (scores > 0.5).any() and (scores < 0.5).any()
    assert (masks > 0).any() and (masks < 0).any()


def test_standin_detects_the_blocks():
    det = torch_reference().predict(scene(3))
    assert len(det) >= 1
    assert det.has_masks and all(m.any() for m in det.masks)
    assert set(det.labels.tolist()) <= {0, 1, 2}


def _box_iou_or_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise box IoU, with equal boxes counted as 1 even when degenerate (zero area after clipping)."""
    from dfineseg.infer.boxes import box_iou

    iou = box_iou(a.astype(np.float64), b.astype(np.float64))
    same = np.abs(a[:, None, :].astype(np.float64) - b[None, :, :]).max(-1) < 1e-3
    return np.where(same, 1.0, iou)


def assert_same_detections(got, ref, box_iou_min: float = 0.99, mask_iou_min: float = 0.95) -> None:
    """Same detections, matched by order of score: equal labels, boxes and masks at original resolution."""
    assert got.image_shape == ref.image_shape
    assert len(got) == len(ref), f"{len(got)} detections vs {len(ref)} in the reference"
    if not len(ref):
        return
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-3)
    ious = np.diag(_box_iou_or_equal(got.boxes, ref.boxes))
    assert ious.min() >= box_iou_min, f"box IoU {ious.min():.4f} < {box_iou_min}"
    assert got.has_masks == ref.has_masks
    if ref.has_masks:
        a, b = got.full_masks(), ref.full_masks()
        inter = (a & b).reshape(len(a), -1).sum(1)
        union = (a | b).reshape(len(a), -1).sum(1)
        miou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        assert miou.min() >= mask_iou_min, f"mask IoU {miou.min():.4f} < {mask_iou_min}"


def assert_matching_detections(got, ref, conf: float, box_iou_min: float = 0.99, mask_iou_min: float = 0.95,
                               margin: float = 0.01) -> int:
    """Order-free comparison for real models (near-equal scores may swap places between runtimes):
    greedy one-to-one matching on box IoU within a class; every detection not within `margin` of the
    threshold must find its partner; matched boxes and masks (original resolution) must agree."""
    assert got.image_shape == ref.image_shape
    iou = _box_iou_or_equal(got.boxes, ref.boxes) if len(got) and len(ref) else np.zeros((len(got), len(ref)))
    iou = np.where(got.labels[:, None] == ref.labels[None, :], iou, 0.0)
    pairs, used_g, used_r = [], set(), set()
    for flat in np.argsort(-iou, axis=None):
        g, r = np.unravel_index(flat, iou.shape)
        if iou[g, r] <= 0.5:
            break
        if g in used_g or r in used_r:
            continue
        used_g.add(g)
        used_r.add(r)
        pairs.append((g, r))
    for dets, used, what in ((got, used_g, "extra"), (ref, used_r, "missing")):
        for i in range(len(dets)):
            if i not in used:
                assert abs(float(dets.scores[i]) - conf) <= margin, (
                    f"{what} detection {i} (score {dets.scores[i]:.3f}, label {dets.labels[i]}) far from the threshold"
                )
    for g, r in pairs:
        assert iou[g, r] >= box_iou_min, f"box IoU {iou[g, r]:.4f} < {box_iou_min}"
        if ref.has_masks:
            a, b = got[int(g)].full_masks()[0], ref[int(r)].full_masks()[0]
            union = (a | b).sum()
            m = (a & b).sum() / union if union else 1.0
            assert m >= mask_iou_min, f"mask IoU {m:.4f} < {mask_iou_min}"
    return len(pairs)
