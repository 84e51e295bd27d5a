"""Hungarian matcher: hand-made assignments, mask costs, the Stable-DINO modulated cost, GO-LSD union."""

from __future__ import annotations

import math

import torch

from dfineseg.config import LossConfig
from dfineseg.loss import HungarianMatcher, downsample_masks, union_of_matches
from dfineseg.loss.box_ops import box_convert, generalized_box_iou
from dfineseg.loss.matcher import focal_class_cost, mask_dice_cost, mask_focal_cost

BIG = 8.0  # a logit whose sigmoid is ~1


def _pairs(indices):
    return [dict(zip(q.tolist(), g.tolist())) for q, g in indices]


def test_obvious_assignment_and_empty_image():
    gt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2]])
    boxes = torch.tensor([[[0.7, 0.7, 0.3, 0.2], [0.5, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]]).repeat(2, 1, 1)
    logits = torch.full((2, 3, 2), -BIG)
    logits[:, 2, 0] = BIG  # query 2 looks like GT 0 (class 0)
    logits[:, 0, 1] = BIG  # query 0 looks like GT 1 (class 1)
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": gt},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    indices = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert _pairs(indices) == [{2: 0, 0: 1}, {}]
    assert indices[1][0].dtype == torch.int64 and indices[1][0].numel() == 0


def test_more_targets_than_queries_matches_every_query():
    targets = [{"labels": torch.tensor([0, 0, 0]), "boxes": torch.rand(3, 4) * 0.5 + 0.25}]
    out = {"pred_logits": torch.zeros(1, 2, 1), "pred_boxes": torch.rand(1, 2, 4) * 0.5 + 0.25}
    ((q, g),) = HungarianMatcher()(out, targets)
    assert sorted(q.tolist()) == [0, 1] and len(set(g.tolist())) == 2


def test_cost_matrix_values_match_the_formula():
    m = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, alpha=0.25, gamma=2)
    logit, pred, gt = 0.3, torch.tensor([0.5, 0.5, 0.2, 0.2]), torch.tensor([0.5, 0.5, 0.4, 0.4])
    out = {"pred_logits": torch.tensor([[[logit]]]), "pred_boxes": pred[None, None]}
    cost = m.cost_matrices(out, [{"labels": torch.tensor([0]), "boxes": gt[None]}])[0]
    p = 1 / (1 + math.exp(-logit))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    giou = 0.04 / 0.16  # the GT box encloses the prediction
    expected = 2 * focal + 5 * 0.4 - 2 * giou
    assert abs(float(cost) - expected) < 1e-5


def test_mask_cost_prefers_the_right_mask():
    h = w = 32
    gt_mask = torch.zeros(1, h, w, dtype=torch.bool)
    gt_mask[0, 4:20, 4:12] = True
    right = torch.full((h // 4, w // 4), -BIG)
    right[1:5, 1:3] = BIG
    wrong = torch.full((h // 4, w // 4), -BIG)
    wrong[4:8, 4:8] = BIG
    box = torch.tensor([[0.25, 0.375, 0.25, 0.5]])
    out = {
        "pred_logits": torch.zeros(1, 2, 1),
        "pred_boxes": box[None].repeat(1, 2, 1),  # identical boxes and classes: only masks differ
        "pred_masks": torch.stack([wrong, right])[None],
    }
    tgt = {"labels": torch.tensor([0]), "boxes": box, "masks": gt_mask}
    ((q, _),) = HungarianMatcher()(out, [tgt])
    assert q.tolist() == [1]
    # A box-only instance ignores the masks: both queries cost the same.
    cost = HungarianMatcher().cost_matrices(out, [{**tgt, "has_mask": torch.tensor([False])}])[0]
    assert torch.allclose(cost[0], cost[1])
    # Without the mask costs (detect task) both queries tie as well.
    cost = HungarianMatcher(use_masks=False).cost_matrices(out, [tgt])[0]
    assert torch.allclose(cost[0], cost[1])


def test_mask_costs_are_the_per_pair_formulas():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    target = (torch.rand(2, 20) > 0.5).float()
    target[1, :5] = 0.25  # soft targets from downsampling
    focal = mask_focal_cost(logits, target, 0.25, 2.0)
    dice = mask_dice_cost(logits, target)
    for q in range(3):
        p = logits[q].sigmoid()
        for g in range(2):
            t = target[g]
            pos = 0.25 * (1 - p) ** 2 * -torch.log(p)
            neg = 0.75 * p**2 * -torch.log(1 - p)
            assert torch.isclose(focal[q, g], (pos * t + neg * (1 - t)).mean(), atol=1e-6)
            d = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            assert torch.isclose(dice[q, g], d, atol=1e-6)


def test_downsample_masks_gives_covered_fraction():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, :4, :2] = True
    low = downsample_masks(m, (2, 2))
    assert torch.allclose(low, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))


def test_position_modulated_cost_formula_and_effect():
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    # Query 0: confident but a poor box; query 1: less confident, exact box.
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]]])
    logits = torch.tensor([[[3.0], [1.0]]])
    out = {"pred_logits": logits, "pred_boxes": boxes}
    tgt = [{"labels": torch.tensor([0]), "boxes": gt}]
    plain = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0)
    modulated = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0, position_modulated=True)
    assert plain(out, tgt)[0][0].tolist() == [0]
    assert modulated(out, tgt)[0][0].tolist() == [1]
    giou = generalized_box_iou(box_convert(boxes[0], "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"))[
        :, 0
    ]
    p = logits[0, :, 0].sigmoid() * ((giou + 1) / 2) ** 0.5
    assert abs(float(giou[0]) - 0.0625) < 1e-6  # IoU 0.01/0.16, the GT encloses it
    expected = focal_class_cost(p, 0.25, 2.0)
    assert torch.allclose(modulated.cost_matrices(out, tgt)[0][:, 0], expected, atol=1e-6)


def test_nan_predictions_do_not_crash():
    boxes = torch.rand(1, 4, 4)
    boxes[0, 1] = float("nan")
    logits = torch.randn(1, 4, 2)
    logits[0, 2, 0] = float("inf")
    masks = torch.randn(1, 4, 8, 8)
    masks[0, 3, 0, 0] = float("nan")
    tgt = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]),
            "masks": torch.ones(2, 32, 32, dtype=torch.bool),
        }
    ]
    m = HungarianMatcher()
    cost = m.cost_matrices({"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}, tgt)[0]
    assert torch.isfinite(cost).all()
    ((q, g),) = m({"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}, tgt)
    assert len(q) == 2 and 1 not in q.tolist()  # the NaN box is never preferred


def test_union_of_matches_keeps_most_frequent_gt_per_query():
    t = torch.tensor
    final = [(t([0, 1]), t([0, 1]))]
    aux = [(t([0, 2, 3]), t([1, 0, 0]))]
    pre = [(t([0, 3]), t([0, 1]))]
    ((q, g),) = union_of_matches([final, aux, pre])
    # q0: g0 twice, g1 once -> g0; q1 -> g1; q2 -> g0; q3: g0 and g1 once each -> the first seen (g0).
    assert dict(zip(q.tolist(), g.tolist())) == {0: 0, 1: 1, 2: 0, 3: 0}
    assert q.tolist() == sorted(q.tolist())
    empty = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]
    ((q, g),) = union_of_matches([empty, empty])
    assert q.numel() == 0 and q.dtype == torch.int64


def test_from_config_reads_loss_config():
    cfg = LossConfig(
        match_class=3.0,
        match_l1=4.0,
        match_giou=1.5,
        match_mask=0.5,
        match_dice=0.25,
        match_alpha=0.3,
        match_gamma=1.5,
        position_modulated_cost=True,
    )
    m = HungarianMatcher.from_config(cfg, "detect")
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.cost_mask, m.cost_dice) == (3.0, 4.0, 1.5, 0.5, 0.25)
    assert (m.alpha, m.gamma, m.position_modulated, m.use_masks) == (0.3, 1.5, True, False)
    assert HungarianMatcher.from_config(LossConfig(), "segment").use_masks
