"""Score predictions against a dataset split: the paper's metrics, the threshold sweep, per-class numbers,
the confusion matrix and COCO mAP, plus the files `dfineseg val` leaves behind.

No torch: the dataset index is read through its attributes (docs/ARCHITECTURE.md section 2:
``DatasetIndex(names, category_ids, images)``, ``ImageRecord(image_id, file, width, height, instances)``,
``Instance(label, box_xyxy, polygons, rle, iscrowd, has_mask)``).

Ground-truth masks are rasterised with pycocotools (the rasteriser COCO itself uses, so the paper metric
and segm mAP see the same pixels) but only over each polygon's own extent: the polygon is shifted to
a canvas just covering it, which gives the same pixels as rasterising at the full image size and
cropping (tests/test_evaluate.py checks it) without ever allocating an image-size mask per object.
An instance without a mask in a segmentation dataset (``has_mask`` false: a box-only annotation)
counts as its filled box.

Predictions should be made at the mAP threshold (``map_conf``, 0.01): COCO mAP and the sweep need the
low-score tail, and the fixed-threshold metrics keep only the scores >= ``conf``.

Every caller that scores a model comes through here (`dfineseg val`, training-time validation, the
benchmark harness), so running a predictor over a split (``predict_index``) and reading the result
(``headline_metrics``, ``print_summary``) live here too, not in a command module the trainer would import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.infer.detections import Detections, crop_rle, integer_boxes
from dfineseg.infer.errors import UserError
from dfineseg.infer.metrics import GroundTruth, PaperMetrics, coco_map, rle_to_crop

TASKS = ("segment", "detect")

# A predictor: RGB uint8 images -> one Detections per image (a PyTorch model, an exported backend, a test stub).
Predict = Callable[[list[np.ndarray]], list[Detections]]


# ---------------------------------------------------------------------------------------- ground truth
def polygons_to_crop(polygons: Sequence[np.ndarray], image_shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Union of pixel polygons -> (bool crop, (x, y) origin), as pycocotools rasterises them at full size."""
    from pycocotools import mask as mask_util

    h0, w0 = image_shape
    polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    polys = [p for p in polys if len(p) >= 3]
    if not polys:
        return np.zeros((0, 0), dtype=bool), (0, 0)
    pts = np.concatenate(polys)
    # One pixel of margin beyond the extent; origin 0 where the polygon reaches the image edge, so the
    # shift never turns a coordinate negative (pycocotools truncates toward zero there).
    x0 = int(min(max(math.floor(pts[:, 0].min()) - 1, 0), w0))
    y0 = int(min(max(math.floor(pts[:, 1].min()) - 1, 0), h0))
    x1 = int(min(max(math.ceil(pts[:, 0].max()) + 2, x0), w0))
    y1 = int(min(max(math.ceil(pts[:, 1].max()) + 2, y0), h0))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), dtype=bool), (0, 0)
    shifted = [(p - [x0, y0]).reshape(-1).tolist() for p in polys]
    rles = mask_util.frPyObjects(shifted, y1 - y0, x1 - x0)
    crop = mask_util.decode(mask_util.merge(rles)).astype(bool)
    return crop, (x0, y0)


def _box_crop(box: np.ndarray, image_shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    x0, y0, x1, y1 = integer_boxes(box[None], image_shape)[0]
    return np.ones((y1 - y0, x1 - x0), dtype=bool), (int(x0), int(y0))


def _instance_crop(inst: Any, image_shape: tuple[int, int], where: str) -> tuple[np.ndarray, tuple[int, int]]:
    if getattr(inst, "rle", None) is not None:
        rle = inst.rle
        if isinstance(rle.get("counts"), list):  # uncompressed RLE: compress it first
            from pycocotools import mask as mask_util

            rle = mask_util.frPyObjects(rle, *rle["size"])
        if [int(v) for v in rle["size"]] != list(image_shape):
            raise UserError(f"{where}: RLE size {rle['size']} differs from the image size {list(image_shape)}")
        return rle_to_crop(rle)
    if getattr(inst, "polygons", None):
        return polygons_to_crop(inst.polygons, image_shape)
    return _box_crop(np.asarray(inst.box_xyxy, dtype=np.float64), image_shape)


def ground_truth_from_record(record: Any, task: str) -> GroundTruth:
    """One ImageRecord -> GroundTruth (compact masks for ``segment``)."""
    shape = (int(record.height), int(record.width))
    insts = list(record.instances)
    boxes = np.array([np.asarray(i.box_xyxy, dtype=np.float32) for i in insts], dtype=np.float32).reshape(-1, 4)
    labels = np.array([int(i.label) for i in insts], dtype=np.int64)
    crowd = np.array([bool(i.iscrowd) for i in insts], dtype=bool)
    if task == "detect":
        return GroundTruth(boxes, labels, shape, iscrowd=crowd)
    crops = [
        _instance_crop(inst, shape, f"{record.file} (instance {k})") if getattr(inst, "has_mask", True) else _box_crop(boxes[k], shape)
        for k, inst in enumerate(insts)
    ]
    return GroundTruth(
        boxes, labels, shape, masks=[c for c, _ in crops],
        mask_origins=np.array([o for _, o in crops], dtype=np.int64).reshape(-1, 2), iscrowd=crowd,
    )


def coco_ground_truth(index: Any, gts: Sequence[GroundTruth], task: str) -> dict:
    """A COCO ground-truth dict on the dataset's own image and category ids."""
    cat_ids = list(index.category_ids)
    images, anns = [], []
    for rec, gt in zip(index.images, gts):
        images.append({"id": int(rec.image_id), "file_name": str(rec.file), "width": int(rec.width), "height": int(rec.height)})
        for k in range(len(gt)):
            x1, y1, x2, y2 = (float(v) for v in gt.boxes[k])
            ann = {
                "id": len(anns) + 1,
                "image_id": int(rec.image_id),
                "category_id": int(cat_ids[int(gt.labels[k])]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": int(gt.iscrowd[k]),
                "area": (x2 - x1) * (y2 - y1),
            }
            if task == "segment":
                rle = crop_rle(gt.masks[k], tuple(gt.mask_origins[k]), gt.image_shape)
                ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
                ann["area"] = float(np.count_nonzero(gt.masks[k]))
            anns.append(ann)
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(cat_ids, index.names)]
    return {"images": images, "annotations": anns, "categories": categories}


# ---------------------------------------------------------------------------------------- inputs
def predict_index(index: Any, predict: Predict, batch: int = 4, progress: bool = False) -> list[Detections]:
    """Detections for every image of a DatasetIndex, in index order (images read as deployment reads them)."""
    from dfineseg.data import read_image
    from dfineseg.infer.batching import chunks

    groups = chunks(index.images, batch)
    if progress:
        from tqdm import tqdm

        groups = tqdm(groups, total=-(-len(index.images) // batch), desc="val", unit="batch", leave=False)
    out: list[Detections] = []
    for group in groups:
        out.extend(predict([read_image(rec.file) for rec in group]))
    return out


def _ordered_predictions(index: Any, predictions: Mapping[int, Detections] | Sequence[Detections], task: str) -> list[Detections]:
    records = list(index.images)
    if isinstance(predictions, Mapping):
        known = {int(r.image_id) for r in records}
        unknown = sorted(set(int(k) for k in predictions) - known)
        if unknown:
            raise UserError(f"predictions for image ids not in the dataset split: {unknown[:10]}")
        ordered = [predictions.get(int(r.image_id)) for r in records]
    else:
        ordered = list(predictions)
        if len(ordered) != len(records):
            raise UserError(f"{len(ordered)} prediction sets for {len(records)} images (pass a dict image_id -> Detections)")
    out = []
    for rec, det in zip(records, ordered):
        shape = (int(rec.height), int(rec.width))
        if det is None:  # an image without predictions: nothing detected
            det = Detections.empty(shape, with_masks=task == "segment")
        if det.image_shape != shape:
            raise UserError(f"{rec.file}: predictions made on a {det.image_shape} image, the dataset says {shape} (H, W)")
        if task == "segment" and det.masks is None:
            raise UserError("task=segment but the predictions have no masks (a detection model?): use task=detect")
        out.append(det)
    return out


def _class_conf_indices(class_conf: Mapping[Any, float] | None, names: Sequence[str]) -> dict[int, float] | None:
    """Per-class thresholds keyed by class index or class name -> keyed by index."""
    if not class_conf:
        return None
    out = {}
    for key, value in class_conf.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            idx = int(key)
        elif key in names:
            idx = list(names).index(key)
        else:
            raise UserError(f"eval.class_conf: unknown class {key!r}; use a class index or one of {list(names)[:10]}")
        if not 0 <= idx < len(names):
            raise UserError(f"eval.class_conf: class index {idx} out of range (0..{len(names) - 1})")
        out[idx] = float(value)
    return out


# ---------------------------------------------------------------------------------------- evaluate
def evaluate(
    index: Any,
    predictions: Mapping[int, Detections] | Sequence[Detections],
    task: str,
    conf: float = 0.5,
    out_dir: str | Path | None = None,
    plots: bool = True,
    map_conf: float = 0.01,
    iou_thr: float = 0.5,
    class_conf: Mapping[Any, float] | None = None,
    max_det: int = 100,
) -> dict:
    """Every number of `dfineseg val` for ``predictions`` (image_id -> Detections, or a list in index order).

    Returns a JSON-able dict: ``headline`` (the numbers to report: mask-based for segment, box-based
    for detect: f1, precision, recall, penalized_iou, map50_95, map50, tp, fp, fn), ``box`` and (segment)
    ``mask`` with the same per IoU type, ``sweep`` (F1/P/R/IoU vs threshold and the best threshold),
    ``per_class``, ``confusion_matrix``. With ``out_dir`` also writes metrics.json, predictions.json
    (COCO results, scores >= map_conf), images.json (image_id -> file) and, with ``plots``, PNG plots.
    """
    if task not in TASKS:
        raise UserError(f"task must be one of {TASKS}, got {task!r}")
    names = list(index.names)
    preds = _ordered_predictions(index, predictions, task)
    gts = [ground_truth_from_record(rec, task) for rec in index.images]
    cc = _class_conf_indices(class_conf, names)

    results: dict[str, Any] = {
        "task": task,
        "conf": float(conf),
        "class_conf": {names[k]: v for k, v in cc.items()} if cc else None,
        "iou_threshold": float(iou_thr),
        "map_conf": float(map_conf),
        "images": len(gts),
        "instances": int(sum(int((~g.iscrowd).sum()) for g in gts)),
    }
    kinds = ("mask", "box") if task == "segment" else ("box",)
    coco_results = []
    for rec, det in zip(index.images, preds):
        keep = np.nonzero(det.scores >= map_conf)[0]
        keep = keep[np.argsort(-det.scores[keep], kind="stable")][:max_det]
        coco_results.extend(det[keep].to_coco(int(rec.image_id), index.category_ids, with_masks=task == "segment"))
    gt_coco = coco_ground_truth(index, gts, task)

    headline_pm: PaperMetrics | None = None
    for kind in kinds:
        metric_task = "segment" if kind == "mask" else "detect"
        pm = PaperMetrics(preds, gts, metric_task, num_classes=len(names), iou_thr=iou_thr)
        outcome = pm.outcome(conf, cc)
        section = outcome.summary()
        section.update(coco_map(gt_coco, coco_results, "segm" if kind == "mask" else "bbox"))
        results[kind] = section
        if headline_pm is None:
            headline_pm, headline_outcome = pm, outcome

    head = results[kinds[0]]
    results["headline"] = {
        "f1": head["f1"], "precision": head["precision"], "recall": head["recall"], "penalized_iou": head["iou"],
        "map50_95": head["map50_95"], "map50": head["map50"], "tp": head["tp"], "fp": head["fp"], "fn": head["fn"],
        # Mean Boundary IoU of the true positives at `conf` (segment only; None for detect).
        "boundary_iou": head.get("boundary_iou"),
    }
    results["sweep"] = headline_pm.sweep()
    results["per_class"] = headline_outcome.per_class(names)
    for row, cat in zip(results["per_class"], index.category_ids):
        row["category_id"] = int(cat)
    results["confusion_matrix"] = {
        "rows": "ground truth", "columns": "prediction",
        "labels": names + ["background"], "matrix": headline_outcome.confusion.tolist(),
    }

    if out_dir is not None:
        write_outputs(Path(out_dir), results, coco_results, index, plots)
    return results


# ---------------------------------------------------------------------------------------- summaries
# The numbers of each IoU type's section ("mask", "box") that the summaries show.
_COLUMNS = ("precision", "recall", "f1", "iou", "map50", "map50_95")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat numbers logged per epoch and offered to `train.best_metric`: `mask_f1`, `box_map50_95`, ...
    for each IoU type the task has, plus `best_f1` / `best_conf` of the threshold sweep."""
    flat: dict[str, float] = {}
    for kind in ("mask", "box"):
        section = metrics.get(kind)
        if not isinstance(section, dict):
            continue
        for key in (*_COLUMNS, "tp", "fp", "fn"):
            if isinstance(section.get(key), int | float):
                flat[f"{kind}_{key}"] = float(section[key])
    sweep = metrics.get("sweep") or {}
    for key in ("best_f1", "best_conf"):
        if isinstance(sweep.get(key), int | float):
            flat[key] = float(sweep[key])
    return flat


def print_summary(metrics: dict[str, Any], file: Any = None) -> None:
    """A small table: one row per IoU type (mask, box), the paper's numbers at `conf` and COCO mAP."""
    import sys

    file = file or sys.stdout
    header = f"{'':6}" + "".join(f"{c:>11}" for c in ("P", "R", "F1", "IoU", "mAP50", "mAP50-95"))
    print(f"conf {metrics.get('conf', float('nan')):.2f}, {metrics.get('images', '?')} images, "
          f"{metrics.get('instances', '?')} instances", file=file)
    print(header, file=file)
    for kind in ("mask", "box"):
        section = metrics.get(kind)
        if isinstance(section, dict):
            print(f"{kind:6}" + "".join(f"{float(section.get(c, float('nan'))):>11.4f}" for c in _COLUMNS), file=file)
    sweep = metrics.get("sweep") or {}
    if "best_f1" in sweep:
        print(f"best F1 {sweep['best_f1']:.4f} at conf {sweep['best_conf']:.2f}", file=file)


# ---------------------------------------------------------------------------------------- files
def _write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    from dfineseg.utils.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def write_outputs(out_dir: Path, results: dict, coco_results: list[dict], index: Any, plots: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "metrics.json", results)
    _write_json(out_dir / "predictions.json", coco_results, indent=None)
    _write_json(out_dir / "images.json", {str(int(r.image_id)): str(r.file) for r in index.images})
    if plots:
        plot_sweep(results["sweep"], out_dir / "f1_curve.png", results["conf"])
        plot_confusion(results["confusion_matrix"], out_dir / "confusion_matrix.png")


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(sweep: dict, path: Path, conf: float | None = None) -> None:
    """F1, precision, recall and penalised IoU vs the confidence threshold, best F1 marked."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    t = sweep["thresholds"]
    for key, style, label in (("f1", "-", "F1"), ("precision", "--", "precision"), ("recall", "-.", "recall"),
                              ("iou", ":", "penalised IoU")):
        ax.plot(t, sweep[key], style, label=label)
    ax.axvline(sweep["best_conf"], color="gray", lw=0.8)
    ax.set_title(f"best F1 {sweep['best_f1']:.3f} at conf {sweep['best_conf']:.2f}")
    if conf is not None:
        ax.axvline(conf, color="red", lw=0.6, ls="--")
    ax.set_xlabel("confidence threshold")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_confusion(cm: dict, path: Path) -> None:
    """Counts, rows = ground truth, columns = prediction, background last; colour normalised per row."""
    plt = _figure()
    m = np.asarray(cm["matrix"], dtype=np.float64)
    labels = cm["labels"]
    n = len(labels)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ticks = range(n) if n <= 60 else []
    ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig: Any, path: Path) -> None:
    import io

    from dfineseg.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
