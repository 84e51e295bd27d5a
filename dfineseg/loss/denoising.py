"""Contrastive denoising queries (DINO / RT-DETR / D-FINE).

Each ground-truth box is repeated in `groups` groups; in every group it appears once as a positive
(box jittered by less than half its size) and once as a negative (jittered by half to one full size).
Labels are flipped at random. The attention mask keeps the matching queries from seeing the denoising
ones and each group from seeing the others.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dfineseg.infer.boxes import box_convert
from dfineseg.loss.box_ops import inverse_sigmoid


def contrastive_denoising_group(
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict[str, Any] | None]:
    """-> (query content [B,D,hidden], reference boxes before sigmoid [B,D,4], attention mask
    [D+Q, D+Q] bool (True = blocked), dn_meta) with D = 2 * max_gt * groups.

    dn_meta: `dn_positive_idx` (per image, the positive queries' indices, groups concatenated),
    `dn_num_group`, `dn_num_split` ([D, Q]).
    """
    if num_denoising <= 0:
        return None, None, None, None
    num_gts = [len(t["labels"]) for t in targets]
    device = class_embed.weight.device
    max_gt = max(num_gts) if num_gts else 0
    if max_gt == 0:
        return None, None, None, {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, num_queries]}

    groups = max(1, num_denoising // max_gt)
    bs = len(targets)
    labels = torch.full((bs, max_gt), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros((bs, max_gt, 4), device=device)
    real = torch.zeros((bs, max_gt), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = num_gts[i]
        if n:
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
            real[i, :n] = True

    # Layout along the query axis: [pos(max_gt), neg(max_gt)] repeated `groups` times.
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    real = real.repeat(1, 2 * groups)
    negative = torch.zeros((bs, 2 * max_gt, 1), device=device)
    negative[:, max_gt:] = 1.0
    negative = negative.repeat(1, groups, 1)
    positive = (1.0 - negative.squeeze(-1)) * real
    pos_idx = torch.nonzero(positive)[:, 1]
    dn_positive_idx = list(torch.split(pos_idx, [n * groups for n in num_gts]))
    total = 2 * max_gt * groups

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & real, random_labels, labels)

    if box_noise_scale > 0:
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative  # positives in [0,1), negatives in [1,2)
        xyxy = (xyxy + sign * magnitude * half_wh).clamp(0.0, 1.0)
        boxes = box_convert(xyxy, "xyxy", "cxcywh").abs()
    boxes_unact = inverse_sigmoid(boxes)
    content = class_embed(labels)

    size = total + num_queries
    attn_mask = torch.zeros((size, size), dtype=torch.bool, device=device)
    attn_mask[total:, :total] = True
    group_id = torch.arange(total, device=device) // (2 * max_gt)
    attn_mask[:total, :total] = group_id[:, None] != group_id[None, :]

    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": groups, "dn_num_split": [total, num_queries]}
    return content, boxes_unact, attn_mask, dn_meta
