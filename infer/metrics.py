"""Accuracy metrics (numpy): the D-FINE-seg paper's fixed-threshold protocol, and COCO mAP.

Paper protocol (seed 002 section 5.1), per image:
1. class-agnostic IoU between every prediction and every ground-truth object (mask IoU for
   segmentation, box IoU for detection);
2. greedy one-to-one matching by descending IoU over the pairs with IoU > 0.5 (strictly greater, as
   the paper says; the reference code accepts >=);
3. a matched pair with equal classes is a TP; with different classes it is one FP and one FN;
   unmatched predictions are FPs, unmatched ground truth FNs;
then precision, recall and F1 from the dataset-wide counts, and the penalised IoU
``sum(IoU of TPs) / (TP + FP + FN)``.

Crowd regions (``iscrowd``) are not objects to find: they never take part in the matching and are
never FNs; a prediction left unmatched that lies mostly inside a crowd region (more than half of its
area, box or mask) is ignored rather than counted as an FP, like COCO's treatment of crowd.

Mask IoU never materialises image-size masks: masks are compact crops (a bool array and its
top-left corner), pairs whose crops do not overlap get IoU 0 without touching pixels, and the others
are intersected only over the overlapping rectangle.

Boundary IoU (Cheng et al. 2021) judges mask edges, which mask IoU hardly sees on large objects: for each
true positive at the threshold, the IoU of the two masks' inner boundary bands (mask pixels within d of the
mask's edge, d = 2% of the image diagonal, at least 1 px), averaged over the true positives
(``boundary_iou``, segmentation only).

COCO mAP50-95 / mAP50 (bbox and segm) come from faster-coco-eval on the dataset's own image and
category ids (``coco_map``); faster-coco-eval and matplotlib are imported only where needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dfineseg.infer.boxes import box_area, box_iou
from dfineseg.infer.detections import Detections
from dfineseg.infer.postprocess import score_threshold

TASKS = ("segment", "detect")
CROWD_IGNORE_FRACTION = 0.5
DEFAULT_SWEEP = np.round(np.arange(1, 100) / 100.0, 2)


# ---------------------------------------------------------------------------------------- ground truth
def rle_to_crop(rle: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """A COCO RLE -> (bool crop over the mask's extent, (x, y) origin). Empty masks give a 0x0 crop."""
    from pycocotools import mask as mask_util

    if isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    full = mask_util.decode(rle).astype(bool)
    ys = np.nonzero(full.any(axis=1))[0]
    if ys.size == 0:
        return np.zeros((0, 0), dtype=bool), (0, 0)
    xs = np.nonzero(full.any(axis=0))[0]
    return np.ascontiguousarray(full[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]), (int(xs[0]), int(ys[0]))


@dataclass(eq=False)  # array fields: no element-wise ==, compare fields explicitly
class GroundTruth:
    """Ground truth of one image: boxes float32 (M,4) xyxy pixels, labels int64 (M,), iscrowd bool (M,),
    and for segmentation compact masks (bool crops + int64 (M,2) (x, y) origins)."""

    boxes: np.ndarray
    labels: np.ndarray
    image_shape: tuple[int, int]
    masks: list[np.ndarray] | None = None
    mask_origins: np.ndarray | None = None
    iscrowd: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        self.iscrowd = np.zeros(n, bool) if self.iscrowd is None else np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        self.image_shape = (int(self.image_shape[0]), int(self.image_shape[1]))
        if len(self.labels) != n or len(self.iscrowd) != n:
            raise ValueError(f"ground truth: {n} boxes, {len(self.labels)} labels, {len(self.iscrowd)} iscrowd flags")
        if self.masks is not None:
            self.masks = list(self.masks)
            self.mask_origins = np.asarray(self.mask_origins, dtype=np.int64).reshape(-1, 2)
            if len(self.masks) != n or len(self.mask_origins) != n:
                raise ValueError(f"ground truth: {len(self.masks)} masks / {len(self.mask_origins)} origins for {n} boxes")

    @classmethod
    def empty(cls, image_shape, with_masks: bool = False) -> GroundTruth:
        return cls(
            np.zeros((0, 4)), np.zeros(0), image_shape, [] if with_masks else None, np.zeros((0, 2)) if with_masks else None
        )

    def __len__(self) -> int:
        return len(self.boxes)


# ---------------------------------------------------------------------------------------- IoU
def _rects(masks: Sequence[np.ndarray], origins: np.ndarray) -> np.ndarray:
    r = np.zeros((len(masks), 4), dtype=np.int64)
    if len(masks):
        r[:, :2] = origins
        r[:, 2] = origins[:, 0] + np.array([m.shape[1] for m in masks])
        r[:, 3] = origins[:, 1] + np.array([m.shape[0] for m in masks])
    return r


def compact_mask_intersections(
    masks_a: Sequence[np.ndarray], origins_a: np.ndarray, masks_b: Sequence[np.ndarray], origins_b: np.ndarray
) -> np.ndarray:
    """(A,B) pixel counts of the intersection of compact masks; only overlapping crops are touched."""
    inter = np.zeros((len(masks_a), len(masks_b)), dtype=np.int64)
    if not len(masks_a) or not len(masks_b):
        return inter
    ra, rb = _rects(masks_a, origins_a), _rects(masks_b, origins_b)
    x0 = np.maximum(ra[:, None, 0], rb[None, :, 0])
    y0 = np.maximum(ra[:, None, 1], rb[None, :, 1])
    x1 = np.minimum(ra[:, None, 2], rb[None, :, 2])
    y1 = np.minimum(ra[:, None, 3], rb[None, :, 3])
    for i, j in zip(*np.nonzero((x1 > x0) & (y1 > y0))):
        a, b = masks_a[i], masks_b[j]
        ya, xa, yb, xb = y0[i, j], x0[i, j], y1[i, j], x1[i, j]
        sub_a = a[ya - ra[i, 1] : yb - ra[i, 1], xa - ra[i, 0] : xb - ra[i, 0]]
        sub_b = b[ya - rb[j, 1] : yb - rb[j, 1], xa - rb[j, 0] : xb - rb[j, 0]]
        inter[i, j] = np.count_nonzero(sub_a & sub_b)
    return inter


BOUNDARY_DILATION_RATIO = 0.02


def boundary_width(image_shape: tuple[int, int], ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary IoU's band width d in pixels: `ratio` of the image diagonal, at least 1."""
    return max(1, int(round(ratio * float(np.hypot(*image_shape)))))


def boundary_band(crop: np.ndarray, width: int) -> np.ndarray:
    """Mask pixels within `width` (chessboard distance) of the mask's edge; the crop holds the whole mask,
    so outside it is background and pixels on the crop's border are edge pixels."""
    import cv2

    if crop.size == 0:
        return crop
    eroded = cv2.erode(crop.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(width),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return crop & ~eroded.astype(bool)


def compact_boundary_iou(mask_a: np.ndarray, origin_a, mask_b: np.ndarray, origin_b, width: int) -> float:
    """Boundary IoU of two compact masks (crop + (x, y) origin) with band width `width`."""
    return _band_iou(boundary_band(mask_a, width), origin_a, boundary_band(mask_b, width), origin_b)


def _band_iou(band_a: np.ndarray, origin_a, band_b: np.ndarray, origin_b) -> float:
    inter = float(compact_mask_intersections([band_a], np.asarray([origin_a]), [band_b], np.asarray([origin_b]))[0, 0])
    union = np.count_nonzero(band_a) + np.count_nonzero(band_b) - inter
    return inter / union if union > 0 else 0.0


def _areas(masks: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([np.count_nonzero(m) for m in masks], dtype=np.int64)


def compact_mask_iou(masks_a, origins_a, masks_b, origins_b) -> np.ndarray:
    inter = compact_mask_intersections(masks_a, origins_a, masks_b, origins_b).astype(np.float64)
    union = _areas(masks_a)[:, None] + _areas(masks_b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _require_masks(pred: Detections, gt: GroundTruth) -> None:
    if pred.masks is None:
        raise ValueError("segment metrics need predicted masks, but the detections have none (a detection model?); use task='detect'")
    if gt.masks is None:
        raise ValueError("segment metrics need ground-truth masks; use task='detect' for a box-only dataset")


def iou_matrix(pred: Detections, gt: GroundTruth, task: str) -> np.ndarray:
    """Class-agnostic (P, M) IoU: mask IoU for ``segment``, box IoU for ``detect``."""
    if task == "detect":
        return box_iou(pred.boxes.astype(np.float64), gt.boxes.astype(np.float64))
    if task == "segment":
        _require_masks(pred, gt)
        return compact_mask_iou(pred.masks, pred.mask_origins, gt.masks, gt.mask_origins)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _fraction_inside(pred: Detections, crowd: GroundTruth, task: str) -> np.ndarray:
    """(P, Mc) fraction of each prediction's area lying inside each crowd region."""
    if task == "detect":
        pb, cb = pred.boxes.astype(np.float64), crowd.boxes.astype(np.float64)
        iw = (np.minimum(pb[:, None, 2], cb[None, :, 2]) - np.maximum(pb[:, None, 0], cb[None, :, 0])).clip(min=0)
        ih = (np.minimum(pb[:, None, 3], cb[None, :, 3]) - np.maximum(pb[:, None, 1], cb[None, :, 1])).clip(min=0)
        area = box_area(pb)[:, None]
        return np.where(area > 0, iw * ih / np.maximum(area, 1e-12), 0.0)
    inter = compact_mask_intersections(pred.masks, pred.mask_origins, crowd.masks, crowd.mask_origins)
    area = _areas(pred.masks)[:, None]
    return np.where(area > 0, inter / np.maximum(area, 1), 0.0)


# ---------------------------------------------------------------------------------------- matching
@dataclass
class _ImageCandidates:
    """Everything the matching of one image needs, for any confidence threshold."""

    scores: np.ndarray  # (P,)
    labels: np.ndarray  # (P,)
    gt_labels: np.ndarray  # (M,) non-crowd only
    pair_pred: np.ndarray  # candidate pairs (IoU > thr), sorted by descending IoU
    pair_gt: np.ndarray
    pair_iou: np.ndarray
    crowd_covered: np.ndarray  # (P,) bool: ignored when left unmatched
    pair_boundary: np.ndarray | None = None  # boundary IoU of each candidate pair (segment only)


def _candidates(pred: Detections, gt: GroundTruth, task: str, iou_thr: float) -> _ImageCandidates:
    if pred.image_shape != gt.image_shape:
        raise ValueError(f"prediction image shape {pred.image_shape} != ground truth {gt.image_shape}")
    real = ~gt.iscrowd
    objects = _select_gt(gt, real)
    iou = iou_matrix(pred, objects, task) if len(pred) and len(objects) else np.zeros((len(pred), len(objects)))
    pi, gi = np.nonzero(iou > iou_thr)
    vals = iou[pi, gi]
    # Descending IoU; ties go to the more confident prediction, then to index order (deterministic).
    order = np.lexsort((gi, pi, -pred.scores[pi], -vals))
    covered = np.zeros(len(pred), dtype=bool)
    if gt.iscrowd.any() and len(pred):
        covered = (_fraction_inside(pred, _select_gt(gt, gt.iscrowd), task) > CROWD_IGNORE_FRACTION).any(axis=1)
    pair_pred, pair_gt = pi[order], gi[order]
    boundary = None
    if task == "segment":
        width = boundary_width(gt.image_shape)
        pred_bands = {p: boundary_band(pred.masks[p], width) for p in set(pair_pred.tolist())}
        gt_bands = {g: boundary_band(objects.masks[g], width) for g in set(pair_gt.tolist())}
        boundary = np.array([
            _band_iou(pred_bands[p], pred.mask_origins[p], gt_bands[g], objects.mask_origins[g])
            for p, g in zip(pair_pred.tolist(), pair_gt.tolist())
        ], dtype=np.float64)
    return _ImageCandidates(pred.scores, pred.labels, objects.labels, pair_pred, pair_gt, vals[order], covered,
                            boundary)


def _select_gt(gt: GroundTruth, keep: np.ndarray) -> GroundTruth:
    idx = np.nonzero(keep)[0]
    return GroundTruth(
        boxes=gt.boxes[idx],
        labels=gt.labels[idx],
        image_shape=gt.image_shape,
        masks=None if gt.masks is None else [gt.masks[i] for i in idx],
        mask_origins=None if gt.masks is None else gt.mask_origins[idx],
        iscrowd=gt.iscrowd[idx],
    )


def greedy_match(pair_pred, pair_gt, pair_iou, active: np.ndarray, with_pair: bool = False) -> list[tuple]:
    """One-to-one matches (p, g, iou) from pairs already sorted by descending IoU, using active predictions
    only; `with_pair` appends each match's index among the pairs."""
    used_p: set[int] = set()
    used_g: set[int] = set()
    out = []
    for k, (p, g, v) in enumerate(zip(pair_pred.tolist(), pair_gt.tolist(), pair_iou.tolist())):
        if not active[p] or p in used_p or g in used_g:
            continue
        used_p.add(p)
        used_g.add(g)
        out.append((p, g, v, k) if with_pair else (p, g, v))
    return out


def prf(tp: float, fp: float, fn: float, iou_sum: float) -> dict[str, float]:
    """Precision, recall, F1 and penalised IoU from counts (0 where a denominator is 0)."""
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "iou": iou_sum / (tp + fp + fn) if tp + fp + fn else 0.0,
    }


@dataclass
class Outcome:
    """Counts at one threshold: totals, per class, and the confusion matrix.

    ``confusion[gt, pred]`` has C+1 rows (ground-truth class, last = background: an FP with no
    matched object) and C+1 columns (predicted class, last = background: a missed object).
    """

    tp: int
    fp: int
    fn: int
    iou_sum: float
    class_tp: np.ndarray
    class_fp: np.ndarray
    class_fn: np.ndarray
    class_iou_sum: np.ndarray
    class_gt: np.ndarray
    confusion: np.ndarray
    boundary_sum: float | None = None  # boundary IoU summed over the true positives (segment only)
    image_counts: np.ndarray | None = None  # (images, 3) int64: each image's tp, fp, fn (they sum to the totals)

    def summary(self) -> dict[str, float]:
        out = {"tp": self.tp, "fp": self.fp, "fn": self.fn, **prf(self.tp, self.fp, self.fn, self.iou_sum)}
        if self.boundary_sum is not None:
            out["boundary_iou"] = self.boundary_sum / self.tp if self.tp else 0.0
        return out

    def per_class(self, names: Sequence[str] | None = None) -> list[dict]:
        rows = []
        for c in range(len(self.class_tp)):
            tp, fp, fn = int(self.class_tp[c]), int(self.class_fp[c]), int(self.class_fn[c])
            rows.append(
                {
                    "class": c,
                    "name": names[c] if names is not None else str(c),
                    "instances": int(self.class_gt[c]),
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    **prf(tp, fp, fn, float(self.class_iou_sum[c])),
                }
            )
        return rows


class PaperMetrics:
    """The paper's fixed-threshold metrics over a dataset, at any threshold without recomputing IoUs.

    ``predictions`` should be made at a low threshold (e.g. 0.01) if ``sweep`` is wanted: each
    threshold keeps the predictions scoring at least that much and re-runs the greedy matching.
    """

    def __init__(
        self,
        predictions: Sequence[Detections],
        ground_truth: Sequence[GroundTruth],
        task: str,
        num_classes: int | None = None,
        iou_thr: float = 0.5,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if len(predictions) != len(ground_truth):
            raise ValueError(f"{len(predictions)} prediction sets for {len(ground_truth)} ground-truth images")
        self.task = task
        self.iou_thr = float(iou_thr)
        self.images = [_candidates(p, g, task, self.iou_thr) for p, g in zip(predictions, ground_truth)]
        max_label = max(
            [int(c.labels.max()) for c in self.images if len(c.labels)]
            + [int(c.gt_labels.max()) for c in self.images if len(c.gt_labels)]
            + [-1]
        )
        self.num_classes = num_classes if num_classes is not None else max_label + 1
        if max_label >= self.num_classes:
            raise ValueError(f"label {max_label} out of range for {self.num_classes} classes")

    def outcome(self, conf: float = 0.5, class_conf: Mapping[int, float] | None = None) -> Outcome:
        c = self.num_classes
        tp = fp = fn = 0
        iou_sum = 0.0
        ctp, cfp, cfn, cgt = (np.zeros(c, np.int64) for _ in range(4))
        ciou = np.zeros(c, np.float64)
        confusion = np.zeros((c + 1, c + 1), np.int64)
        boundary_sum = 0.0 if self.task == "segment" else None
        per_image = np.zeros((len(self.images), 3), np.int64)
        for index, im in enumerate(self.images):
            active = im.scores >= score_threshold(im.labels, conf, class_conf)
            matches = greedy_match(im.pair_pred, im.pair_gt, im.pair_iou, active, with_pair=True)
            matched_p = np.zeros(len(im.scores), bool)
            matched_g = np.zeros(len(im.gt_labels), bool)
            for p, g, v, k in matches:
                matched_p[p] = matched_g[g] = True
                pl, gl = im.labels[p], im.gt_labels[g]
                confusion[gl, pl] += 1
                if pl == gl:
                    tp += 1
                    iou_sum += v
                    if boundary_sum is not None:
                        boundary_sum += float(im.pair_boundary[k])
                    ctp[gl] += 1
                    ciou[gl] += v
            counted = active & ~(~matched_p & im.crowd_covered)  # unmatched inside crowd: ignored
            image_tp = sum(1 for p, g, _, _ in matches if im.labels[p] == im.gt_labels[g])
            per_image[index] = (image_tp, int(counted.sum()) - image_tp, len(im.gt_labels) - image_tp)
            fp += int(per_image[index, 1])
            fn += int(per_image[index, 2])
            np.add.at(cgt, im.gt_labels, 1)
            np.add.at(cfp, im.labels[counted], 1)
            np.add.at(cfn, im.gt_labels, 1)
            np.add.at(confusion, (im.gt_labels[~matched_g], c), 1)
            np.add.at(confusion, (c, im.labels[counted & ~matched_p]), 1)
        cfp -= ctp
        cfn -= ctp
        return Outcome(tp, fp, fn, iou_sum, ctp, cfp, cfn, ciou, cgt, confusion, boundary_sum, per_image)

    def _counts_per_threshold(self, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """TP, FP, FN, sum of TP IoU at every threshold at once: the same greedy matching as
        ``outcome``, run over the candidate pairs once with the thresholds as a vector dimension."""
        n_t = len(thr)
        tp = np.zeros(n_t, np.int64)
        fp = np.zeros(n_t, np.int64)
        fn = np.zeros(n_t, np.int64)
        iou_sum = np.zeros(n_t, np.float64)
        for im in self.images:
            active = im.scores[None, :] >= thr.astype(np.float32)[:, None]  # (T, P), float32 as in outcome
            used_p = np.zeros_like(active)
            used_g = np.zeros((n_t, len(im.gt_labels)), dtype=bool)
            image_tp = np.zeros(n_t, np.int64)
            for p, g, v in zip(im.pair_pred.tolist(), im.pair_gt.tolist(), im.pair_iou.tolist()):
                take = active[:, p] & ~used_p[:, p] & ~used_g[:, g]
                used_p[:, p] |= take
                used_g[:, g] |= take
                if im.labels[p] == im.gt_labels[g]:
                    image_tp += take
                    iou_sum += take * v
            ignored = (active & ~used_p & im.crowd_covered[None, :]).sum(axis=1)
            tp += image_tp
            fp += active.sum(axis=1) - ignored - image_tp
            fn += len(im.gt_labels) - image_tp
        return tp, fp, fn, iou_sum

    def sweep(self, thresholds: Sequence[float] | None = None) -> dict:
        """Precision/recall/F1/IoU at each threshold, and the threshold with the best F1 (lowest on ties)."""
        thr = DEFAULT_SWEEP if thresholds is None else np.asarray(thresholds, dtype=np.float64).reshape(-1)
        tp, fp, fn, iou_sum = self._counts_per_threshold(thr)
        rows = [prf(int(a), int(b), int(c), float(d)) for a, b, c, d in zip(tp, fp, fn, iou_sum)]
        f1 = np.array([r["f1"] for r in rows])
        best = int(np.argmax(f1)) if len(f1) else 0
        return {
            "thresholds": [float(t) for t in thr],
            "precision": [r["precision"] for r in rows],
            "recall": [r["recall"] for r in rows],
            "f1": f1.tolist(),
            "iou": [r["iou"] for r in rows],
            "best_conf": float(thr[best]) if len(thr) else float("nan"),
            "best_f1": float(f1[best]) if len(f1) else 0.0,
        }


def paper_metrics(
    predictions: Sequence[Detections],
    ground_truth: Sequence[GroundTruth],
    task: str,
    conf: float = 0.5,
    iou_thr: float = 0.5,
    class_conf: Mapping[int, float] | None = None,
) -> dict[str, float]:
    """tp, fp, fn, precision, recall, f1, iou at one threshold (see the module docstring)."""
    return PaperMetrics(predictions, ground_truth, task, iou_thr=iou_thr).outcome(conf, class_conf).summary()


def sweep(predictions, ground_truth, task: str, thresholds=None, iou_thr: float = 0.5) -> dict:
    return PaperMetrics(predictions, ground_truth, task, iou_thr=iou_thr).sweep(thresholds)


def f1_difference_se(counts_a: np.ndarray, counts_b: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    """Standard error of F1(b) - F1(a) measured on one set of images, from which images happened to be drawn.

    `counts_*`: (images, 3) tp, fp, fn per image of the two models on the same images (`Outcome.image_counts`).
    Paired bootstrap: the images are resampled with replacement, the same resample for both models, and F1 is
    recomputed from the summed counts (F1 is not a mean over images, so no closed form). Measured on 60
    validation images of four N models, F1 ~0.55, INT8 against float: 0.008-0.013 (docs/BENCHMARKS.md). A
    fixed seed keeps the same inputs giving the same answer."""
    a = np.asarray(counts_a, np.int64).reshape(-1, 3)
    b = np.asarray(counts_b, np.int64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"per-image counts of {len(a)} and {len(b)} images: the two models must see the same images")
    if len(a) < 2:
        return 0.0
    picks = np.random.default_rng(seed).integers(0, len(a), size=(draws, len(a)))

    def f1(counts: np.ndarray) -> np.ndarray:
        sums = counts[picks].sum(axis=1)  # (draws, 3)
        denom = 2 * sums[:, 0] + sums[:, 1] + sums[:, 2]
        return np.divide(2.0 * sums[:, 0], denom, out=np.zeros(len(sums)), where=denom > 0)

    return float((f1(b) - f1(a)).std())


# ---------------------------------------------------------------------------------------- COCO mAP
def _quiet(*_args, **_kwargs) -> None:
    return None


def coco_map(gt_coco: dict, results: Sequence[dict], iou_type: str) -> dict[str, float]:
    """COCO mAP50-95 and mAP50 (faster-coco-eval, 100 detections per image) for ``bbox`` or ``segm``.

    ``gt_coco`` is a COCO ground-truth dict with the dataset's own image and category ids; ``results``
    are COCO results entries (e.g. from ``Detections.to_coco``). Undefined values (no ground truth)
    are reported as 0.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    from faster_coco_eval import COCO, COCOeval_faster

    # COCOeval writes into annotation dicts (ignore flags, RLE conversion) and loadRes into result
    # entries (ids, areas): hand it shallow copies of each, so the caller's dicts stay as they were
    # without the cost of deep-copying every segmentation.
    gt_copy = {**gt_coco, "annotations": [dict(a) for a in gt_coco.get("annotations", [])]}
    gt = COCO(gt_copy, print_function=_quiet)
    known = set(gt.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise ValueError(f"results refer to image ids absent from the ground truth: {sorted(unknown)[:10]}")
    if iou_type == "segm" and results and any("segmentation" not in r for r in results):
        raise ValueError("segm mAP needs a 'segmentation' in every result entry")
    dt = gt.loadRes([dict(r) for r in results])
    ev = COCOeval_faster(gt, dt, iou_type, print_function=_quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats
    return {"map50_95": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0)}
