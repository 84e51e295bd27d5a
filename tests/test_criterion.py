"""D-FINE-seg criterion: each term against a hand computation, minima at perfect predictions, the full
output layout (aux/pre/enc/dn), sanitising, the Stable-DINO loss switch, gradients, and the real model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfineseg.config import LossConfig, ModelConfig
from dfineseg.loss import aggregate_losses, build_criterion, total_loss
from dfineseg.loss.fdr import fdr_bin_values, fdr_targets
from dfineseg.loss.functions import ddf_loss, fgl_loss, mask_losses

# Loss values are read with float() on tensors that require grad; that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

BIG = 20.0
R = 32  # reg_max


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def synthetic_outputs(b=2, q=12, c=3, layers=3, h=32, w=32, groups=2, ngts=(2, 1), seed=0, masks=True):
    """A hand-built training dict in the model's layout (docs/ARCHITECTURE.md section 3) plus targets."""
    g = torch.Generator().manual_seed(seed)

    def head(n, with_corners=True, with_masks=masks):
        d = {
            "pred_logits": torch.randn(b, n, c, generator=g).requires_grad_(),
            "pred_boxes": (torch.rand(b, n, 4, generator=g) * 0.4 + 0.3).requires_grad_(),
        }
        if with_corners:
            d["pred_corners"] = torch.randn(b, n, 4 * (R + 1), generator=g).requires_grad_()
        if with_masks:
            d["pred_masks"] = torch.randn(b, n, h // 4, w // 4, generator=g).requires_grad_()
        return d

    def stack(n):
        ls = [head(n) for _ in range(layers)]
        ref = torch.rand(b, n, 4, generator=g) * 0.4 + 0.3  # every FDR layer shares the initial reference
        for layer in ls:
            layer["ref_points"] = ref
        for layer in ls[:-1] if n == q else ls:
            layer["teacher_corners"] = ls[-1]["pred_corners"]
            layer["teacher_logits"] = ls[-1]["pred_logits"]
        return ls

    main = stack(q)
    out = {k: v for k, v in main[-1].items() if not k.startswith("teacher")}
    out.update(
        up=torch.tensor([0.5]),
        reg_scale=torch.tensor([4.0]),
        aux_outputs=main[:-1],
        pre_outputs=head(q, False),
        enc_aux_outputs=[head(q, False, False)],
        enc_meta={"class_agnostic": False},
    )
    max_gt = max(ngts)
    ndn = 2 * max_gt * groups
    out["dn_outputs"] = stack(ndn)
    out["dn_pre_outputs"] = head(ndn, False)
    out["dn_meta"] = {
        "dn_positive_idx": [
            torch.cat([torch.arange(n) + 2 * max_gt * k for k in range(groups)]) for n in ngts
        ],
        "dn_num_group": groups,
        "dn_num_split": [ndn, q],
    }
    targets = []
    for n in ngts:
        m = torch.zeros(n, h, w, dtype=torch.bool)
        for i in range(n):
            m[i, 8:24, 4 + 4 * i : 20] = True
        targets.append(
            {
                "labels": torch.randint(0, c, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.3 + 0.35,
                "masks": m,
                "has_mask": torch.ones(n, dtype=torch.bool),
            }
        )
    return out, targets


def _one_query(pred_box, logits, masks=None, corners=None):
    out = {
        "pred_logits": torch.tensor([[logits]], dtype=torch.float32).requires_grad_(),
        "pred_boxes": torch.tensor([[pred_box]], dtype=torch.float32).requires_grad_(),
    }
    if masks is not None:
        out["pred_masks"] = masks[None, None].clone().requires_grad_()
    return out


# ------------------------------------------------------------------ layout and key names
def test_full_layout_key_names_and_gradients():
    out, targets = synthetic_outputs()
    crit = build_criterion(LossConfig(), num_classes=3, task="segment")
    losses = crit(out, targets)
    base = ["loss_vfl", "loss_bbox", "loss_giou"]
    local = ["loss_fgl"]
    masks = ["loss_mask_bce", "loss_mask_dice"]
    expected = set(base + local + masks)
    expected |= {f"{k}_aux_{i}" for i in range(2) for k in base + local + ["loss_ddf"] + masks}
    expected |= {f"{k}_pre" for k in base} | {f"{k}_enc_0" for k in base}
    expected |= {f"{k}_dn_{i}" for i in range(3) for k in base + local + ["loss_ddf"] + masks}
    expected |= {f"{k}_dn_pre" for k in base} | {"num_sanitized"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["num_sanitized"]) == 0
    assert float(losses["loss_ddf_dn_2"].detach()) == 0  # the last denoising layer is its own teacher
    total = total_loss(losses)
    total.backward()
    for key in ("pred_logits", "pred_boxes", "pred_corners", "pred_masks"):
        assert out[key].grad is not None and out[key].grad.abs().sum() > 0, key
        assert out["aux_outputs"][0][key].grad.abs().sum() > 0, key
        assert out["dn_outputs"][1][key].grad.abs().sum() > 0, key
    agg = aggregate_losses(losses)
    assert set(agg) == {
        "loss_vfl",
        "loss_bbox",
        "loss_giou",
        "loss_fgl",
        "loss_ddf",
        "loss_mask_bce",
        "loss_mask_dice",
        "num_sanitized",
        "loss",
    }
    assert math.isclose(agg["loss"], float(total.detach()), rel_tol=1e-5)
    assert math.isclose(
        agg["loss_bbox"], sum(v.item() for k, v in losses.items() if k.startswith("loss_bbox")), rel_tol=1e-5
    )


def test_detect_task_has_no_mask_terms():
    out, targets = synthetic_outputs(masks=False)
    losses = build_criterion(LossConfig(), 3, "detect")(out, targets)
    assert not any("mask" in k for k in losses)
    assert "loss_fgl" in losses and "loss_ddf_aux_0" in losses


def test_weights_come_from_config():
    out, targets = synthetic_outputs(seed=1)
    ref = build_criterion(LossConfig(), 3)(out, targets)
    cfg = LossConfig(l1=10.0, mask_dice=0.5, fgl=0.3)
    got = build_criterion(cfg, 3)(out, targets)
    assert torch.isclose(got["loss_bbox_aux_1"], ref["loss_bbox_aux_1"] * 2)
    assert torch.isclose(got["loss_mask_dice_dn_0"], ref["loss_mask_dice_dn_0"] * 0.5)
    assert torch.isclose(got["loss_fgl"], ref["loss_fgl"] * 2)
    assert torch.isclose(got["loss_vfl"], ref["loss_vfl"])



# ------------------------------------------------------------------ the one table of loss terms
def test_loss_table_drives_config_criterion_and_names():
    from dfineseg.loss.terms import DEFAULT_TERM_WEIGHTS, LOSS_WEIGHTS, WEIGHT_KEY

    cfg = LossConfig()
    # The config's weight keys and defaults are the table's (and the papers': the keys users write).
    assert {w.key: getattr(cfg, w.key) for w in LOSS_WEIGHTS} == {
        "vfl": 1.0, "l1": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5, "mask_bce": 1.0, "mask_dice": 1.0}
    assert list(LossConfig.model_fields)[: len(LOSS_WEIGHTS)] == [w.key for w in LOSS_WEIGHTS]
    assert build_criterion(cfg, 3).weights == DEFAULT_TERM_WEIGHTS
    # Every name the criterion returns (final, aux, pre, enc, dn; both classification losses) is in the table.
    out, targets = synthetic_outputs()
    names = set(aggregate_losses(build_criterion(cfg, 3)(out, targets))) - {"loss", "num_sanitized"}
    psl = LossConfig(position_supervised_cls=True)
    names |= set(aggregate_losses(build_criterion(psl, 3)(out, targets))) - {"loss", "num_sanitized"}
    assert names == set(WEIGHT_KEY)


def test_unknown_weight_name_is_refused():
    from dfineseg.loss import DFINESegCriterion, HungarianMatcher

    with pytest.raises(ValueError, match="loss_boxx"):
        DFINESegCriterion(3, HungarianMatcher(), weights={"loss_boxx": 2.0})


def test_loss_table_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, dfineseg.config, dfineseg.loss.terms; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"

# ------------------------------------------------------------------ classification and boxes
def test_vfl_l1_giou_known_values():
    # One query, two classes, one GT of class 1 whose box encloses the prediction: IoU = GIoU = 0.25.
    logits = [0.4, -0.3]
    out = _one_query([0.5, 0.5, 0.2, 0.2], logits)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    losses = build_criterion(LossConfig(), 2, "detect")(out, targets)
    assert set(losses) == {"loss_vfl", "loss_bbox", "loss_giou", "num_sanitized"}
    iou = 0.25
    vfl = iou * _bce(logits[1], iou) + 0.75 * _sigmoid(logits[0]) ** 2 * _bce(logits[0], 0.0)
    assert math.isclose(float(losses["loss_vfl"]), vfl, rel_tol=1e-5)
    assert math.isclose(float(losses["loss_bbox"]), 5 * 0.4, rel_tol=1e-5)
    assert math.isclose(float(losses["loss_giou"]), 2 * (1 - 0.25), rel_tol=1e-5)


def test_perfect_prediction_minimises_class_and_box_terms():
    box = [0.4, 0.6, 0.3, 0.2]
    out = _one_query(box, [BIG, -BIG])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([box])}]
    losses = build_criterion(LossConfig(), 2, "detect")(out, targets)
    for key in ("loss_vfl", "loss_bbox", "loss_giou"):
        assert float(losses[key]) < 1e-6, key


def test_position_supervised_loss_replaces_vfl_with_the_stable_dino_formula():
    # Two GTs in one image, each predicted by the query with the same index: IoUs 0.5 and 0.25 (boxes
    # nested in their GT), so t = IoU^2 / max IoU^2 = 1 and 0.25.
    gts = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    preds = torch.tensor([[0.3, 0.3, 0.2, 0.1], [0.7, 0.7, 0.1, 0.1]])
    logits = torch.tensor([[3.0, -2.0], [-1.0, 0.5], [-4.0, -3.0]])  # query 2 is a negative
    preds = torch.cat([preds, torch.tensor([[0.1, 0.9, 0.05, 0.05]])])
    out = {"pred_logits": logits[None].clone().requires_grad_(), "pred_boxes": preds[None].clone()}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": gts}]
    cfg = LossConfig(position_supervised_cls=True, vfl=1.0)
    crit = build_criterion(cfg, 2, "detect")
    assert crit.matcher(out, targets)[0][0].tolist() == [0, 1]
    losses = crit(out, targets)
    assert "loss_psl" in losses and "loss_vfl" not in losses
    t = {(0, 0): 1.0, (1, 1): 0.25}
    expected = 0.0
    for q in range(3):
        for c in range(2):
            x = float(logits[q, c])
            p = _sigmoid(x)
            if (q, c) in t:
                expected += abs(t[(q, c)] - p) ** 2 * _bce(x, t[(q, c)])
            else:
                expected += p**2 * _bce(x, 0.0)
    assert math.isclose(float(losses["loss_psl"]), expected / 2, rel_tol=1e-5)  # / number of GT boxes
    plain = build_criterion(LossConfig(), 2, "detect")(out, targets)
    assert not math.isclose(float(plain["loss_vfl"]), float(losses["loss_psl"]), rel_tol=1e-3)


# ------------------------------------------------------------------ FGL and DDF
def test_fdr_bin_values_match_the_weighting_function():
    w = fdr_bin_values(R, torch.tensor([0.5]), torch.tensor([4.0]))
    assert w.shape == (33,)
    step = 3.0 ** (1 / 15)  # (up * c + 1) ** (2 / (R - 2))
    assert torch.allclose(
        w[[0, 1, 2, 16, 17, 31, 32]],
        torch.tensor([-4.0, -2.0, 1 - step**14, 0.0, step - 1, 2.0, 4.0]),
        atol=1e-5,
    )
    assert (w[1:] > w[:-1]).all()


def test_fgl_known_values_and_minimum():
    ref = torch.tensor([[0.5, 0.5, 0.5, 0.25]])  # sizes chosen so the float32 maths is exact
    # GT == reference: every edge distance is 0, i.e. exactly bin 16.
    gt = torch.tensor([[0.25, 0.375, 0.75, 0.625]])
    left, wl, wr = fdr_targets(ref, gt, R, 4.0, 0.5)
    assert (
        left.tolist() == [16] * 4 and torch.allclose(wl, torch.ones(4)) and torch.allclose(wr, torch.zeros(4))
    )
    uniform = torch.zeros(4, R + 1)
    assert math.isclose(
        float(fgl_loss(uniform, left, wl, wr, torch.tensor([0.8]), 1.0)), 4 * math.log(33) * 0.8, rel_tol=1e-5
    )
    peaked = torch.full((4, R + 1), -BIG)
    peaked[:, 16] = BIG
    assert float(fgl_loss(peaked, left, wl, wr, torch.tensor([1.0]), 1.0)) < 1e-6
    # Left edge halfway between bins 16 (0) and 17 (step - 1): distance d = (step-1)/2 in units of w/c.
    step = 3.0 ** (1 / 15)
    d = (step - 1) / 2
    gt2 = gt.clone()
    gt2[0, 0] = 0.5 - (2 + d) * 0.5 / 4  # x1 = cx - (c/2 + d) * w / c
    left, wl, wr = fdr_targets(ref, gt2, R, 4.0, 0.5)
    assert left.tolist()[0] == 16 and math.isclose(float(wl[0]), 0.5, abs_tol=1e-4)
    logits = torch.randn(4, R + 1, generator=torch.Generator().manual_seed(3))
    ce = -F.log_softmax(logits, -1)
    hand = 0.5 * ce[0, 16] + 0.5 * ce[0, 17] + ce[1:, 16].sum()
    assert torch.isclose(fgl_loss(logits, left, wl, wr, torch.tensor([1.0]), 2.0), hand / 2, atol=1e-4)
    # Beyond the last bin the weight goes wholly to it.
    gt3 = torch.tensor([[0.0, 0.3, 0.6, 0.7]])
    left, wl, wr = fdr_targets(torch.tensor([[0.5, 0.5, 0.01, 0.4]]), gt3, R, 4.0, 0.5)
    assert left[0] == R - 1 and float(wr[0]) == 1.0


def test_ddf_known_value():
    temperature = 5.0
    corners = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weight = torch.tensor([0.9, 0.3])
    matched = torch.tensor([True, False])

    def kl(t, s):
        pt = [math.exp(v / temperature) for v in t]
        ps = [math.exp(v / temperature) for v in s]
        pt = [v / sum(pt) for v in pt]
        ps = [v / sum(ps) for v in ps]
        return sum(a * math.log(a / b) for a, b in zip(pt, ps))

    pos = 0.9 * temperature**2 * kl(teacher[0].tolist(), corners[0].tolist())
    neg = 0.3 * temperature**2 * kl(teacher[1].tolist(), corners[1].tolist())
    got = ddf_loss(corners, teacher, weight, matched, 2.0, 3.0, temperature)
    assert math.isclose(float(got), (pos * 2 + neg * 3) / 5, rel_tol=1e-5)
    assert float(ddf_loss(teacher, teacher, weight, matched, 2.0, 3.0)) < 1e-7


def test_ddf_in_the_criterion_uses_iou_for_matched_and_teacher_confidence_for_the_rest():
    gt_box = [0.5, 0.5, 0.4, 0.4]
    boxes = torch.tensor([[gt_box, [0.2, 0.2, 0.1, 0.1]]])
    teacher_corners = torch.randn(1, 2, 4 * (R + 1), generator=torch.Generator().manual_seed(0))
    teacher_logits = torch.tensor([[[BIG], [-0.5]]])  # query 0 is the match in every layer
    ref = torch.tensor([[gt_box, [0.2, 0.2, 0.1, 0.1]]])
    aux = {
        "pred_logits": teacher_logits.clone(),
        "pred_boxes": boxes.clone(),
        "ref_points": ref,
        "pred_corners": torch.zeros(1, 2, 4 * (R + 1), requires_grad=True),
        "teacher_corners": teacher_corners,
        "teacher_logits": teacher_logits,
    }
    out = {
        "pred_logits": teacher_logits,
        "pred_boxes": boxes,
        "pred_corners": teacher_corners,
        "ref_points": ref,
        "up": torch.tensor([0.5]),
        "reg_scale": torch.tensor([4.0]),
        "aux_outputs": [aux],
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([gt_box])}]
    losses = build_criterion(LossConfig(), 1, "detect")(out, targets)
    kl = (
        F.softmax(teacher_corners.reshape(-1, R + 1) / 5, -1)
        * (F.log_softmax(teacher_corners.reshape(-1, R + 1) / 5, -1) - math.log(1 / (R + 1)))
    ).sum(-1) * 25
    pos = kl[:4].mean() * 1.0  # IoU 1
    neg = kl[4:].mean() * _sigmoid(-0.5)
    mix = math.sqrt(4 * 8)  # 4 matched and 4 unmatched edges, batch 1
    expected = 1.5 * (pos * mix + neg * mix) / (2 * mix)
    assert torch.isclose(losses["loss_ddf_aux_0"], expected, rtol=1e-4)
    assert "loss_ddf" not in losses  # the final layer is the teacher


# ------------------------------------------------------------------ masks
def test_mask_losses_known_values_and_crop():
    logits = torch.zeros(1, 4, 4)
    target = torch.zeros(1, 4, 4)
    target[0, 1:3, 1:2] = 1.0
    box = torch.tensor([[0.5, 0.5, 0.5, 0.5]])  # pixels x 1..2, y 1..2 of 4x4: a 2x2 ROI holding 2 GT pixels
    bce, dice = mask_losses(logits, target, box)
    assert math.isclose(float(bce), math.log(2), rel_tol=1e-5)
    assert math.isclose(float(dice), 1 - (2 * 0.5 * 2 + 1) / (0.5 * 4 + 2 + 1), rel_tol=1e-5)
    garbage = logits.clone()
    garbage[0, 0, :] = 7.0  # outside the ROI: no effect
    garbage[0, :, 3] = -5.0
    assert torch.allclose(torch.stack(mask_losses(garbage, target, box)), torch.stack([bce, dice]))
    perfect = torch.where(target.bool(), BIG, -BIG)
    assert all(float(v) < 1e-6 for v in mask_losses(perfect, target, box))


def test_mask_terms_in_the_criterion_downsample_gt_and_skip_box_only():
    h = w = 16
    gt_mask = torch.zeros(1, h, w, dtype=torch.bool)
    gt_mask[0, 4:12, 4:8] = True  # at 1/4: rows 1..2, col 1
    box = [0.375, 0.5, 0.25, 0.5]
    low = torch.full((4, 4), -BIG)
    low[1:3, 1] = BIG
    out = _one_query(box, [BIG], masks=low)
    tgt = {
        "labels": torch.tensor([0]),
        "boxes": torch.tensor([box]),
        "masks": gt_mask,
        "has_mask": torch.tensor([True]),
    }
    crit = build_criterion(LossConfig(), 1, "segment")
    losses = crit(out, [tgt])
    assert float(losses["loss_mask_bce"]) < 1e-6 and float(losses["loss_mask_dice"]) < 1e-6
    out_wrong = _one_query(box, [BIG], masks=torch.zeros(4, 4))
    wrong = crit(out_wrong, [tgt])
    assert math.isclose(float(wrong["loss_mask_bce"]), math.log(2), rel_tol=1e-5)
    box_only = crit(out_wrong, [{**tgt, "has_mask": torch.tensor([False])}])
    assert float(box_only["loss_mask_bce"]) == 0 and float(box_only["loss_mask_dice"]) == 0
    box_only["loss_mask_bce"].backward()  # still part of the graph (DDP needs every output used)


# ------------------------------------------------------------------ robustness
def test_nan_and_degenerate_boxes_are_sanitised_and_counted():
    out, targets = synthetic_outputs(seed=2)
    with torch.no_grad():
        out["pred_boxes"][0, 0] = float("nan")
        out["pred_boxes"][1, 3, 2] = -0.1  # negative width
        out["aux_outputs"][0]["pred_logits"][0, 5, 1] = float("inf")
        out["dn_outputs"][0]["pred_masks"][1, 4, 0, 0] = float("nan")  # a positive dn query
    targets[1]["boxes"][0, 3] = 0.0  # a zero-height GT must not crash either
    losses = build_criterion(LossConfig(), 3)(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["num_sanitized"]) == 5
    total_loss(losses).backward()
    for key in ("pred_boxes", "pred_logits", "pred_corners"):
        assert torch.isfinite(out[key].grad).all(), key


def test_empty_targets_give_finite_connected_losses():
    out, targets = synthetic_outputs(ngts=(1, 1), seed=3)
    empty = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
            "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
            "has_mask": torch.zeros(0, dtype=torch.bool),
        }
    ] * 2
    out.pop("dn_outputs"), out.pop("dn_pre_outputs"), out.pop("dn_meta")
    losses = build_criterion(LossConfig(), 3)(out, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_vfl"]) > 0  # all queries are negatives
    total_loss(losses).backward()


def test_bad_labels_and_dn_meta_give_clear_errors():
    out, targets = synthetic_outputs()
    crit = build_criterion(LossConfig(), 3)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="outside 0..2"):
        crit(out, bad)
    out["dn_meta"]["dn_num_group"] = 3
    with pytest.raises(ValueError, match="dn_meta"):
        crit(out, targets)


def test_loss_is_fp32_under_autocast():
    out, targets = synthetic_outputs(seed=4)

    def half(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().bfloat16() if obj.is_floating_point() else obj
        if isinstance(obj, dict):
            return {k: half(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [half(v) for v in obj]
        return obj

    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = build_criterion(LossConfig(), 3)(half(out), targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------ the real model
def test_real_tiny_model_backward():
    from dfineseg.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", num_queries=20, num_denoising=8), num_classes=2).train()
    h = w = 64
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 8:40, 8:40] = True
    masks[1, 30:60, 20:50] = True
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.375, 0.375, 0.5, 0.5], [0.547, 0.703, 0.469, 0.469]]),
            "masks": masks,
            "has_mask": torch.tensor([True, False]),
        },
        {
            "labels": torch.tensor([1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.25, 0.25]]),
            "masks": masks[:1],
            "has_mask": torch.tensor([True]),
        },
    ]
    out = model(torch.rand(2, 3, h, w), targets)
    losses = build_criterion(LossConfig(), 2, "segment")(out, targets)
    assert {
        "loss_mask_bce",
        "loss_mask_dice",
        "loss_fgl",
        "loss_ddf_aux_0",
        "loss_vfl_enc_0",
        "loss_mask_bce_dn_0",
    } <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    total_loss(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
