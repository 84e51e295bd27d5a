"""Point-sampled mask losses and matcher costs (dfineseg/loss/mask_points.py): exact when the points cover
the ROI / map, unbiased when they sample it, inside the GT box ROI, and the model's embedding outputs give
the same losses as full logit maps."""

from __future__ import annotations

import pytest
import torch

from dfineseg.config import LossConfig, ModelConfig
from dfineseg.loss import DFINESegCriterion, build_criterion, total_loss
from dfineseg.loss.functions import mask_losses, point_mask_losses, roi_masks
from dfineseg.loss.mask_points import MaskSource, matcher_points, roi_bounds, roi_points
from dfineseg.loss.matcher import HungarianMatcher, mask_dice_cost, mask_focal_cost
from dfineseg.model import build_model

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _instances(m=5, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, h, w, generator=g) * 3
    target = (torch.rand(m, h, w, generator=g) > 0.6).float()
    cxcy = torch.rand(m, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(m, 2, generator=g) * 0.5 + 0.02
    return logits, target, torch.cat([cxcy, wh], 1)


def _point_losses(logits, target, boxes, points, importance=0.0):
    size = tuple(logits.shape[-2:])
    rows, tgt = logits.flatten(1), target.flatten(1)
    idx, valid, area = roi_points(rows, roi_bounds(boxes, size), size[1], points, 3.0, importance)
    return point_mask_losses(rows.gather(1, idx), tgt.gather(1, idx), valid, area), idx, valid


@pytest.mark.parametrize("points", [0, 100000])
def test_points_covering_every_roi_pixel_equal_the_full_map_loss(points):
    logits, target, boxes = _instances()
    (bce, dice), _, _ = _point_losses(logits, target, boxes, points)
    want_bce, want_dice = mask_losses(logits, target, boxes)
    torch.testing.assert_close(bce, want_bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dice, want_dice, rtol=1e-5, atol=1e-6)


def test_sampled_points_lie_in_the_roi_and_estimate_the_roi_loss_without_bias():
    logits, target, boxes = _instances(m=3, h=40, w=40, seed=1)
    boxes[:] = torch.tensor([0.5, 0.5, 0.8, 0.7])  # ROIs of ~32x28 pixels, far more than 64 points
    roi = roi_masks(boxes, (40, 40)).flatten(1)
    torch.manual_seed(0)
    draws = []
    for _ in range(300):
        (bce, _), idx, valid = _point_losses(logits, target, boxes, 64)
        assert valid.all() and idx.shape == (3, 64)
        assert roi.gather(1, idx).all(), "a point outside its box ROI"
        draws.append(bce)
    want_bce, _ = mask_losses(logits, target, boxes)
    draws = torch.stack(draws)
    # Mean of 300 independent estimates: within 4 standard errors of the full-ROI value.
    assert abs(float(draws.mean() - want_bce)) < 4 * float(draws.std()) / 300**0.5
    assert float(draws.std()) > 0  # really sampled


def test_importance_sampling_prefers_uncertain_points():
    logits, target, boxes = _instances(m=2, h=40, w=40, seed=2)
    boxes[:] = torch.tensor([0.5, 0.5, 1.0, 1.0])
    torch.manual_seed(0)
    _, idx_imp, _ = _point_losses(logits, target, boxes, 100, importance=1.0)
    _, idx_uni, _ = _point_losses(logits, target, boxes, 100, importance=0.0)
    rows = logits.flatten(1)
    assert rows.gather(1, idx_imp).abs().mean() < 0.5 * rows.gather(1, idx_uni).abs().mean()


def test_small_rois_are_enumerated_exactly_next_to_sampled_large_ones():
    logits, target, _ = _instances(m=2, h=40, w=40, seed=3)
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.9, 0.9]])  # 4x4 (16 px) and 36x36 ROIs
    (_, _), idx, valid = _point_losses(logits, target, boxes, 50)
    assert int(valid[0].sum()) == 16 and valid[1].all()
    want = roi_masks(boxes[:1], (40, 40)).flatten(1)[0].nonzero().squeeze(1)
    assert sorted(idx[0, valid[0]].tolist()) == want.tolist()


def test_matcher_points_shared_subset_and_full_map_costs():
    g = torch.Generator().manual_seed(4)
    q, gts, h, w = 7, 3, 12, 10
    masks = torch.randn(1, q, h, w, generator=g)
    gt = torch.rand(gts, h, w, generator=g) > 0.5
    out = {"pred_logits": torch.randn(1, q, 2, generator=g), "pred_boxes": torch.rand(1, q, 4, generator=g) * 0.3 + 0.3,
           "pred_masks": masks}
    tgt = [{"labels": torch.tensor([0, 1, 0]), "boxes": torch.rand(gts, 4, generator=g) * 0.3 + 0.3, "masks": gt}]
    box_only = HungarianMatcher(cost_mask=0, cost_dice=0).cost_matrices(out, tgt)[0]
    lg, tg = masks[0].flatten(1), gt.flatten(1).float()
    full = mask_focal_cost(lg, tg, 0.25, 2.0) + mask_dice_cost(lg, tg)
    for points in (0, h * w, 10**6):
        got = HungarianMatcher(points=points).cost_matrices(out, tgt)[0]
        torch.testing.assert_close(got - box_only, full, rtol=1e-5, atol=1e-5)
    torch.manual_seed(5)
    got = HungarianMatcher(points=40).cost_matrices(out, tgt)[0]
    torch.manual_seed(5)
    idx = matcher_points((h, w), 40, torch.device("cpu"))
    assert idx.shape == (40,) and len(set(idx.tolist())) == 40
    sub = mask_focal_cost(lg[:, idx], tg[:, idx], 0.25, 2.0) + mask_dice_cost(lg[:, idx], tg[:, idx])
    torch.testing.assert_close(got - box_only, sub, rtol=1e-5, atol=1e-5)


def _embed_outputs(model_out):
    """The same training dict with full [B,Q,h,w] logits instead of embeddings (the pre-change format)."""
    def conv(d):
        d = dict(d)
        if "mask_embed" in d:
            emb, pix = d.pop("mask_embed"), d.pop("mask_pixels")
            b, c, h, w = pix.shape
            d["pred_masks"] = (emb @ pix.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return d
    res = conv(model_out)
    for key in ("aux_outputs", "dn_outputs"):
        res[key] = [conv(d) for d in model_out[key]]
    return res


def test_model_embeddings_give_the_full_map_losses_and_train_the_mask_head():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", task="segment", num_queries=20, num_denoising=8), 3).train()
    h = w = 64
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 8:40, 10:30] = True
    masks[1, 30:60, 28:60] = True
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.31, 0.38, 0.33, 0.52], [0.69, 0.70, 0.52, 0.5]]),
                "masks": masks, "has_mask": torch.tensor([True, True])}]
    targets.append({**targets[0], "labels": torch.tensor([1, 1])})
    out = model(torch.rand(2, 3, h, w), targets)
    crit = build_criterion(LossConfig(mask_points=0, match_points=0), 3, "segment")
    torch.manual_seed(1)
    got = crit(out, targets)
    torch.manual_seed(1)
    want = crit(_embed_outputs(out), targets)
    assert set(got) == set(want) and any(k.startswith("loss_mask_dice_dn_") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    total_loss(got).backward()
    for name in ("embed.0.weight", "lateral.0.conv.weight", "refine.1.conv.weight"):
        grad = model.mask_head.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_mask_source_rejects_outputs_without_masks_and_config_bounds():
    with pytest.raises(ValueError, match="mask_embed"):
        MaskSource({"pred_logits": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match="mask_importance"):
        DFINESegCriterion(3, HungarianMatcher(), mask_importance=2.0)
    with pytest.raises(Exception, match="mask_points"):
        LossConfig(mask_points=-1)
