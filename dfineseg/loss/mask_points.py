"""Mask logits where the losses need them, and the pixels (points) they are evaluated at.

Why: a training step used to build [B,Q,H/4,W/4] logits for every decoder, encoder and denoising layer,
then the matcher and the losses used a few matched rows of them; at 640 px that was most of the step
(the product itself, its backward through `pred[b, q]` selections, and elementwise work on unused maps).
The model's training forward now returns per output `mask_embed` [B,Q,C] (already scaled) and the shared
`mask_pixels` [B,C,h,w]; a mask logit is their dot product (`MaskSource`). Full `pred_masks` logits
[B,Q,h,w] (as eval returns, or hand-built in tests) are accepted too.

Points are pixel centres of the mask-head map, drawn as flat indices (no interpolation), so a point's
logit and target are exactly the full map's values there and every estimate below is of the full-map
quantity:

- Matcher (`matcher_points`): one set of pixels per image shared by all queries and GTs, drawn uniformly
  without replacement, so the focal and dice costs stay [Q,C]x[C,P] and [Q,P]x[P,G] products. `points <= 0`
  or `points >= h*w` uses every pixel (the full-map cost).
- Losses (`roi_points`), following D-FINE-seg section 3.3, which restricts the mask BCE to the GT box's ROI
  (normalised by the ROI's pixel count) and computes dice inside that ROI: every point is drawn inside the
  instance's ROI (the integer pixel box the GT box touches, `criterion.roi_masks`), so the ROI restriction
  is the sampling domain rather than a weight. An ROI with at most K pixels is enumerated exactly (the
  points are its pixels, each once), which is the full-map loss; that is every instance when `points <= 0`.
  A larger ROI gets K points as in Mask2Former / Mask DINO: `oversample * K` uniform candidates in the
  ROI, the `importance * K` most uncertain (|logit| closest to 0) of them, and the rest uniform in the ROI.
  The BCE is the mean over the points (an unbiased estimate of the ROI mean for the uniform part) and the
  dice sums are rescaled by ROI pixels / K so its smoothing constant keeps its full-map meaning; importance
  sampling biases both towards the boundary, as in those papers, which is its purpose.
"""

from __future__ import annotations

from typing import Any

import torch


class MaskSource:
    """Mask logits of one output dict: `pred_masks` [B,Q,h,w], or `mask_embed` [B,Q,C] + `mask_pixels` [B,C,h,w]."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.full = out.get("pred_masks")
        self.embed = out.get("mask_embed")
        self.pixels = out.get("mask_pixels")
        if self.full is None and (self.embed is None or self.pixels is None):
            raise ValueError("output has neither pred_masks nor mask_embed + mask_pixels")
        ref = self.full if self.full is not None else self.pixels
        self.size = (int(ref.shape[-2]), int(ref.shape[-1]))
        self.device = ref.device

    @staticmethod
    def present(out: dict[str, Any] | None) -> bool:
        return out is not None and (
            out.get("pred_masks") is not None
            or (out.get("mask_embed") is not None and out.get("mask_pixels") is not None)
        )

    def rows(self, b: int, queries: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, h*w] of the given queries of image b (the whole map: needed for the finite check
        and the uncertainty of candidate points; a GEMM over n matched rows is cheap)."""
        if self.full is not None:
            return self.full[b, queries.to(self.full.device)].flatten(1).float()
        emb = self.embed[b, queries.to(self.embed.device)].float()
        return emb @ self.pixels[b].flatten(1).float()

    def at(self, b: int, flat_idx: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits [Q, P] of every query of image b at the shared flat pixel indices (None: all pixels)."""
        if self.full is not None:
            maps = self.full[b].flatten(1)
            return (maps if flat_idx is None else maps[:, flat_idx]).float()
        pix = self.pixels[b].flatten(1)
        if flat_idx is not None:
            pix = pix[:, flat_idx]
        return self.embed[b].float() @ pix.float()

    def zero(self) -> torch.Tensor:
        """A zero that depends on every mask tensor (DDP wants each output in the graph)."""
        if self.full is not None:
            return self.full.sum().float() * 0
        return (self.embed.sum() + self.pixels.sum()).float() * 0


def matcher_points(size: tuple[int, int], points: int, device: torch.device) -> torch.Tensor | None:
    """Flat pixel indices shared by all queries and GTs of one image; None means every pixel."""
    total = size[0] * size[1]
    if points <= 0 or points >= total:
        return None
    return torch.randperm(total, device=device)[:points]


def roi_bounds(boxes_cxcywh: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[M,4] normalised cxcywh -> int64 [M,4] (x1, y1, x2, y2) of the pixels each box touches, at least one
    pixel, x2/y2 exclusive: the one ROI rule (`criterion.roi_masks` is its dense form)."""
    h, w = size
    cx, cy, bw, bh = boxes_cxcywh.float().unbind(-1)
    x1 = ((cx - bw / 2) * w).floor().clamp(0, w - 1)
    y1 = ((cy - bh / 2) * h).floor().clamp(0, h - 1)
    x2 = torch.maximum(((cx + bw / 2) * w).ceil().clamp(max=w), x1 + 1)
    y2 = torch.maximum(((cy + bh / 2) * h).ceil().clamp(max=h), y1 + 1)
    return torch.stack([x1, y1, x2, y2], -1).long()


def roi_points(
    logits: torch.Tensor,
    bounds: torch.Tensor,
    width: int,
    points: int,
    oversample: float = 3.0,
    importance: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points inside each instance's ROI.

    logits [M, h*w] (only read, for the uncertainty of candidates), bounds [M,4] from `roi_bounds`.
    -> (flat indices int64 [M,K], valid bool [M,K], ROI pixel count float [M]). Rows whose ROI has at most
    K pixels list each ROI pixel once (valid marks the padding); K = `points`, or the largest ROI when
    `points <= 0` or when every ROI is smaller (nothing to sample).
    """
    device = logits.device
    x1, y1, x2, y2 = bounds.unbind(-1)
    rw = x2 - x1
    area = rw * (y2 - y1)
    largest = int(area.max()) if area.numel() else 1
    k = largest if points <= 0 else min(points, largest)
    j = torch.arange(k, device=device)[None, :]
    # Exact rows: the j-th ROI pixel in row-major order; padding repeats pixel 0 and is masked out.
    exact_u = torch.where(j < area[:, None], j, torch.zeros_like(j))
    valid = j < area[:, None]
    u = exact_u
    sampled = area > k
    if bool(sampled.any()):
        rows = sampled.nonzero().squeeze(1)
        a = area[rows].float()[:, None]
        n_imp = min(int(importance * k), k)
        n_cand = max(int(oversample * k), n_imp)
        with torch.no_grad():
            pick = (torch.rand(len(rows), k - n_imp, device=device) * a).long()
            if n_imp > 0:
                cand = (torch.rand(len(rows), n_cand, device=device) * a).long()
                cand_flat = _flat(cand, x1[rows], y1[rows], rw[rows], width)
                uncertainty = -logits[rows].detach().gather(1, cand_flat).abs()
                top = uncertainty.topk(n_imp, dim=1).indices
                pick = torch.cat([cand.gather(1, top), pick], 1)
        u = u.clone()
        u[rows] = pick
        valid = valid.clone()
        valid[rows] = True
    return _flat(u, x1, y1, rw, width), valid, area.float()


def _flat(u: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor, rw: torch.Tensor, width: int) -> torch.Tensor:
    """ROI-local row-major pixel numbers [M,K] -> flat indices into the [h*w] map."""
    rw = rw[:, None]
    return (y1[:, None] + u // rw) * width + x1[:, None] + u % rw
