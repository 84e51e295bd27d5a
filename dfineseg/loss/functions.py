"""The loss terms as pure functions of matched predictions and targets (no matching, no weights).

`DFINESegCriterion` (criterion.py) picks the matched rows and weights the results; the terms' names and
weights are in terms.py. The formulas (docs/ARCHITECTURE.md section 3):
- classification: VFL (alpha 0.75, gamma 2; target = IoU at the GT class), or with the Stable-DINO switch
  the position-supervised loss (seed 004 eq. 3): positives |t - p|^gamma * BCE(p, t) with t = IoU^2
  divided by the image's largest IoU^2 (the paper's "highest equals 1.0" rescaling for 300 queries),
  negatives p^gamma * BCE(p, 0).
- boxes: L1 on cxcywh and 1 - GIoU.
- FGL: cross-entropy of each edge's 33-bin distribution against the two bins around the GT distance
  (fdr.py), linearly weighted, times the layer's IoU. DDF: T^2 KL(teacher || layer), T=5, weighted per
  edge; the matched and unmatched means are mixed by the given counts.
- masks: BCE inside the GT box's ROI normalised by the ROI's pixel count, and dice inside the ROI, both
  averaged over the instances (D-FINE-seg section 3.3); `point_mask_losses` evaluates them at points inside
  the ROI (mask_points.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfineseg.loss.box_ops import box_convert, elementwise_giou, xyxy_clamped
from dfineseg.loss.mask_points import roi_bounds


def vfl_loss(
    logits: torch.Tensor,
    idx: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    ious: torch.Tensor,
    num_boxes: float,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Varifocal loss: positives BCE towards IoU weighted by IoU, negatives alpha * p^gamma * BCE(p, 0)."""
    onehot = torch.zeros_like(logits)
    onehot[idx[0], idx[1], labels] = 1.0
    score = torch.zeros_like(logits)
    score[idx[0], idx[1], labels] = ious.to(logits.dtype)
    p = logits.sigmoid().detach()
    weight = alpha * p.pow(gamma) * (1 - onehot) + score
    return F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="sum") / num_boxes


def position_supervised_loss(
    logits: torch.Tensor,
    idx: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    ious: torch.Tensor,
    num_boxes: float,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Stable-DINO eq. 3 with t = IoU^2 rescaled so each image's largest t is 1."""
    t = ious.to(logits.dtype).pow(2)
    if t.numel():
        per_image_max = torch.zeros(logits.shape[0], device=logits.device, dtype=t.dtype)
        per_image_max = per_image_max.scatter_reduce(0, idx[0], t, reduce="amax", include_self=True)
        t = t / per_image_max[idx[0]].clamp(min=1e-12)
    onehot = torch.zeros_like(logits)
    onehot[idx[0], idx[1], labels] = 1.0
    target = torch.zeros_like(logits)
    target[idx[0], idx[1], labels] = t
    p = logits.sigmoid().detach()
    weight = torch.where(onehot.bool(), (target - p).abs().pow(gamma), p.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / num_boxes


def box_losses(src: torch.Tensor, tgt: torch.Tensor, num_boxes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 sum, (1 - GIoU) sum), both / num_boxes, for matched cxcywh rows."""
    l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    giou = elementwise_giou(xyxy_clamped(src), box_convert(tgt, "cxcywh", "xyxy"))
    return l1, (1 - giou).sum() / num_boxes


def fgl_loss(
    corners: torch.Tensor,
    left: torch.Tensor,
    w_left: torch.Tensor,
    w_right: torch.Tensor,
    ious: torch.Tensor,
    num_boxes: float,
) -> torch.Tensor:
    """Fine-grained localisation: corners [4M, R+1] logits; IoU weight per box repeated over its 4 edges."""
    ce = F.cross_entropy(corners, left, reduction="none") * w_left
    ce = ce + F.cross_entropy(corners, left + 1, reduction="none") * w_right
    return (ce * ious.repeat_interleave(4)).sum() / num_boxes


def ddf_loss(
    corners: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    matched: torch.Tensor,
    num_pos: float,
    num_neg: float,
    temperature: float = 5.0,
) -> torch.Tensor:
    """Decoupled distillation: corners/teacher [E, R+1] logits, weight/matched [E] per edge."""
    kl = F.kl_div(
        F.log_softmax(corners / temperature, -1),
        F.softmax(teacher.detach() / temperature, -1),
        reduction="none",
    ).sum(-1)
    per_edge = weight.detach() * temperature**2 * kl
    pos = per_edge[matched].mean() if matched.any() else per_edge.sum() * 0
    neg = per_edge[~matched].mean() if (~matched).any() else per_edge.sum() * 0
    return (pos * num_pos + neg * num_neg) / max(num_pos + num_neg, 1e-12)


def roi_masks(boxes_cxcywh: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[M,4] normalised boxes -> bool [M,h,w]: the pixels a box touches (at least one pixel; `roi_bounds`)."""
    h, w = size
    x1, y1, x2, y2 = roi_bounds(boxes_cxcywh, size).unbind(-1)
    xs = torch.arange(w, device=boxes_cxcywh.device)
    ys = torch.arange(h, device=boxes_cxcywh.device)
    inside_x = (xs[None] >= x1[:, None]) & (xs[None] < x2[:, None])
    inside_y = (ys[None] >= y1[:, None]) & (ys[None] < y2[:, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


def mask_losses(
    logits: torch.Tensor, target: torch.Tensor, boxes_cxcywh: torch.Tensor, dice_eps: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-cropped (BCE per ROI pixel, dice inside the ROI), each averaged over the M instances."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0
        return zero, zero
    roi = roi_masks(boxes_cxcywh, tuple(logits.shape[-2:])).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * roi).sum((1, 2)) / roi.sum((1, 2))
    prob = logits.sigmoid() * roi
    tgt = target * roi
    inter = (prob * tgt).sum((1, 2))
    dice = 1 - (2 * inter + dice_eps) / (prob.sum((1, 2)) + tgt.sum((1, 2)) + dice_eps)
    return bce.mean(), dice.mean()


def point_mask_losses(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, roi_area: torch.Tensor, dice_eps: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_losses` from points inside each ROI: logits/target/valid [M,K], roi_area [M] pixels.

    BCE = mean over the valid points; dice sums are scaled by ROI pixels / valid points (1 when the points
    are the whole ROI, which makes both terms equal to `mask_losses` on the full map)."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0
        return zero, zero
    v = valid.to(logits.dtype)
    count = v.sum(1).clamp(min=1)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * v).sum(1) / count
    scale = roi_area.to(logits.dtype) / count
    prob = logits.sigmoid() * v
    tgt = target * v
    inter = (prob * tgt).sum(1) * scale
    dice = 1 - (2 * inter + dice_eps) / ((prob.sum(1) + tgt.sum(1)) * scale + dice_eps)
    return bce.mean(), dice.mean()
