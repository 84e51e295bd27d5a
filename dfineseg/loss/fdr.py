"""D-FINE's fine-grained distribution refinement (FDR) bins, shared by the decoder and the loss.

The decoder integrates each box edge's distribution over these bins; the FGL loss encodes the GT edges in
the same bins. One implementation, so the two cannot drift apart. It lives beside the other maths the model
takes from `dfineseg.loss` (box ops, denoising): the model imports the loss package, never the reverse,
and importing `dfineseg.model` would build the whole model package.
"""

from __future__ import annotations

from typing import Any

import torch


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """The non-uniform bin positions W(n), n = 0..reg_max (reg_max + 1 values, symmetric around 0)."""
    u1 = up.abs()[0] * reg_scale.abs()[0]
    u2 = 2 * u1
    step = (u1 + 1) ** (2 / (reg_max - 2))
    half = reg_max // 2
    exps = torch.arange(1, half, dtype=up.dtype, device=up.device)
    right = step ** exps - 1
    left = -(step ** exps.flip(0)) + 1
    return torch.cat([-u2[None], left, torch.zeros_like(u1)[None], right, u2[None]])


def fdr_bin_values(reg_max: int, up: Any, reg_scale: Any) -> torch.Tensor:
    """`weighting_function` for the loss's inputs (the model output's `up` / `reg_scale`, tensors or
    numbers), e.g. -4, -2, -1.79, ..., 0, ..., 2, 4 for c=4."""
    up_t = torch.as_tensor(up, dtype=torch.float32).reshape(-1)
    c = torch.as_tensor(reg_scale, dtype=torch.float32, device=up_t.device).reshape(-1)
    return weighting_function(reg_max, up_t, c)


@torch.no_grad()
def fdr_targets(
    ref_cxcywh: torch.Tensor, gt_xyxy: torch.Tensor, reg_max: int, reg_scale: Any, up: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GT edge distances in bin space -> (left bin int64 [4M], left weight [4M], right weight [4M]).

    Edge order per box is (left, top, right, bottom), as in the corner logits. Distances outside the bins
    go wholly to the end bin.
    """
    values = fdr_bin_values(reg_max, up, reg_scale).to(ref_cxcywh.device)
    c = torch.as_tensor(reg_scale, dtype=torch.float32, device=ref_cxcywh.device).reshape(-1)[0].abs()
    cx, cy = ref_cxcywh[:, 0], ref_cxcywh[:, 1]
    sx = ref_cxcywh[:, 2] / c + 1e-16
    sy = ref_cxcywh[:, 3] / c + 1e-16
    dist_ = (
        torch.stack(
            [
                (cx - gt_xyxy[:, 0]) / sx,
                (cy - gt_xyxy[:, 1]) / sy,
                (gt_xyxy[:, 2] - cx) / sx,
                (gt_xyxy[:, 3] - cy) / sy,
            ],
            -1,
        ).reshape(-1)
        - 0.5 * c
    )
    idx = (values[None, :] <= dist_[:, None]).sum(1) - 1
    left = idx.clamp(0, reg_max - 1)
    lv, rv = values[left], values[left + 1]
    w_right = ((dist_ - lv) / (rv - lv)).clamp(0, 1)
    w_right = torch.where(idx < 0, torch.zeros_like(w_right), w_right)
    w_right = torch.where(idx >= reg_max, torch.ones_like(w_right), w_right)
    return left, 1 - w_right, w_right
