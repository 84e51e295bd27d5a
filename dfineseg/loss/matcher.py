"""Hungarian matching of queries to ground-truth instances (D-FINE costs + D-FINE-seg mask costs).

Cost per (query, GT) pair, each term weighted from `LossConfig.match_*`:
- class: sigmoid focal cost (alpha, gamma) at the GT class; with the Stable-DINO position-modulated switch
  it is evaluated on p * ((GIoU + 1) / 2) ** 0.5 instead of p (seed 004, eq. 4);
- L1 between cxcywh boxes, and -GIoU;
- segment only, for GTs that have a mask: sigmoid focal mask cost averaged over mask pixels, and 1 - dice,
  both at mask-head resolution (D-FINE-seg section 3.4), over `points` pixels per image drawn uniformly
  and shared by all queries and GTs (`loss.match_points`; 0, or at least the map's pixel count, uses the
  full map as the paper does). See dfineseg/loss/mask_points.py.

The mask costs are matrix products over the P sampled pixels ([Q,P] x [P,G]), so memory is O((Q+G)*P),
never Q*G*P. GT masks are brought to mask-head resolution once per image by `downsample_masks` (area
averaging: each low-resolution pixel holds the covered fraction, a soft target); the criterion does that
once per step and passes `masks_lowres` in the targets so the several matcher calls share it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dfineseg.loss.box_ops import box_convert, generalized_box_iou
from dfineseg.loss.mask_points import MaskSource, matcher_points

Indices = list[tuple[torch.Tensor, torch.Tensor]]

# A cost the solver accepts (it rejects inf/NaN) yet larger than any real cost.
_COST_CAP = 1e4


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool/float [N,H,W] -> float32 [N,h,w] holding the covered fraction of each low-resolution pixel."""
    m = masks.to(torch.float32)
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    if m.shape[0] == 0:
        return m.new_zeros((0, *size))
    return F.interpolate(m[:, None], size=size, mode="area")[:, 0]


def focal_class_cost(prob: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal matching cost of probabilities (any shape): positive focal term minus negative one."""
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    return pos - neg


def mask_focal_cost(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Pairwise sigmoid focal cost [Q,P] logits x [G,P] soft targets -> [Q,G], mean over pixels.

    sum_p pos*t + neg*(1-t) = (pos - neg) @ t + sum_p neg: one matrix product. A matching cost: computes
    in place on its temporaries, so it is not differentiable (the matcher runs under no_grad).
    """
    prob = logits.sigmoid()
    softplus = F.softplus(logits)  # -log(1 - p); -log(p) = softplus - logits
    # In place where possible: at 640 px this runs on [300, 12544] per image and layer, and each fresh
    # temporary costs as much as the arithmetic (measured 89 -> 61 ms per call on one core).
    pos = (1 - prob).pow_(gamma).mul_(softplus - logits).mul_(alpha)
    neg = prob.pow_(gamma).mul_(softplus).mul_(1 - alpha)
    return (pos.sub_(neg) @ target.T + neg.sum(-1, keepdim=True)) / max(logits.shape[1], 1)


def mask_dice_cost(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Pairwise 1 - dice between [Q,P] logits (as probabilities) and [G,P] soft targets -> [Q,G]."""
    prob = logits.sigmoid()
    inter = prob @ target.T
    denom = prob.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1 - (2 * inter + eps) / (denom + eps)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to GT instances per image (scipy `linear_sum_assignment`)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        position_modulated: bool = False,
        use_masks: bool = True,
        points: int = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("matcher: class, L1 and GIoU costs are all 0 (set loss.match_class/l1/giou)")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.alpha = alpha
        self.gamma = gamma
        self.position_modulated = position_modulated
        self.use_masks = use_masks
        self.points = points

    @classmethod
    def from_config(cls, loss_cfg: Any, task: str = "segment") -> HungarianMatcher:
        return cls(
            cost_class=loss_cfg.match_class,
            cost_bbox=loss_cfg.match_l1,
            cost_giou=loss_cfg.match_giou,
            cost_mask=loss_cfg.match_mask,
            cost_dice=loss_cfg.match_dice,
            alpha=loss_cfg.match_alpha,
            gamma=loss_cfg.match_gamma,
            position_modulated=loss_cfg.position_modulated_cost,
            use_masks=task == "segment",
            points=loss_cfg.match_points,
        )

    @torch.no_grad()
    def cost_matrices(self, outputs: dict[str, Any], targets: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Per image the [Q, G_b] float32 cost matrix (finite: NaN/inf are capped)."""
        logits = outputs["pred_logits"].detach().float()
        boxes = outputs["pred_boxes"].detach().float()
        masks = MaskSource(outputs) if self.use_masks and MaskSource.present(outputs) else None
        costs = []
        for b, tgt in enumerate(targets):
            labels = tgt["labels"].to(logits.device)
            if labels.numel() == 0:
                costs.append(logits.new_zeros((logits.shape[1], 0)))
                continue
            gt_boxes = tgt["boxes"].to(boxes.device, torch.float32)
            pred_xyxy = box_convert(boxes[b], "cxcywh", "xyxy")
            giou = generalized_box_iou(pred_xyxy, box_convert(gt_boxes, "cxcywh", "xyxy"))
            prob = logits[b].sigmoid()[:, labels]
            if self.position_modulated:
                prob = prob * ((giou + 1) / 2).clamp(0, 1).sqrt()
            cost = (
                self.cost_class * focal_class_cost(prob, self.alpha, self.gamma)
                + self.cost_bbox * torch.cdist(boxes[b], gt_boxes, p=1)
                - self.cost_giou * giou
            )
            if masks is not None and (self.cost_mask or self.cost_dice):
                cost = cost + self._mask_cost(masks, b, tgt)
            costs.append(torch.nan_to_num(cost, nan=_COST_CAP, posinf=_COST_CAP, neginf=-_COST_CAP))
        return costs

    def _mask_cost(self, masks: MaskSource, b: int, tgt: dict[str, Any]) -> torch.Tensor | float:
        size = masks.size
        device = masks.device
        lowres = tgt.get("masks_lowres")
        if lowres is None:
            if tgt.get("masks") is None:
                return 0.0
            lowres = downsample_masks(tgt["masks"].to(device), size)
        lowres = lowres.to(device, torch.float32)
        if lowres.shape[0] == 0:
            return 0.0
        has_mask = tgt.get("has_mask")
        idx = matcher_points(size, self.points, device)
        logits = masks.at(b, idx).detach()
        target = lowres.flatten(1)
        if idx is not None:
            target = target[:, idx]
        cost = (
            self.cost_mask * mask_focal_cost(logits, target, self.alpha, self.gamma)
            if self.cost_mask
            else 0.0
        )
        if self.cost_dice:
            cost = cost + self.cost_dice * mask_dice_cost(logits, target)
        if has_mask is not None:
            # Box-only instances are matched on class and box costs alone.
            cost = cost * has_mask.to(device, torch.float32)[None, :]
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Any]]) -> Indices:
        """-> per image (query indices, GT indices), int64 on CPU, sorted by query index."""
        indices = []
        for cost in self.cost_matrices(outputs, targets):
            if cost.shape[1] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


def union_of_matches(match_lists: list[Indices]) -> Indices:
    """GO-LSD union: all (query, GT) pairs of several matchings; each query keeps its most frequent GT.

    Ties go to the pair seen first (the first matching in `match_lists` is the final layer's), so the
    result is deterministic.
    """
    result = []
    for per_image in zip(*match_lists):
        best: dict[int, tuple[int, int, int]] = {}  # query -> (count, -first_seen, gt)
        counts: dict[tuple[int, int], int] = {}
        first_seen: dict[tuple[int, int], int] = {}
        order = 0
        for rows, cols in per_image:
            for q, g in zip(rows.tolist(), cols.tolist()):
                counts[(q, g)] = counts.get((q, g), 0) + 1
                first_seen.setdefault((q, g), order)
                order += 1
        for (q, g), n in counts.items():
            key = (n, -first_seen[(q, g)], g)
            if q not in best or key[:2] > best[q][:2]:
                best[q] = key
        queries = np.array(sorted(best), dtype=np.int64)
        gts = np.array([best[q][2] for q in queries.tolist()], dtype=np.int64)
        result.append((torch.from_numpy(queries), torch.from_numpy(gts)))
    return result
