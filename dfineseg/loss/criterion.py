"""D-FINE-seg training criterion over the model's training dict (docs/ARCHITECTURE.md section 3).

It matches, picks the matched rows of every output and assembles the terms of functions.py, each
multiplied by its weight (terms.py: one table of names, `loss:` config keys and the papers' defaults).
Classification is `loss_vfl`, or `loss_psl` with the Stable-DINO switch (weight `vfl`); boxes `loss_bbox`,
`loss_giou`; FGL/DDF `loss_fgl`, `loss_ddf` (DDF's teacher is the last decoder layer, weighted by IoU for
matched queries and the teacher's max class probability for the rest, matched/unmatched means mixed by
sqrt counts); masks (segment) `loss_mask_bce`, `loss_mask_dice`, on matched instances that have a mask,
evaluated at points inside the GT box's ROI (`loss.mask_points`, see mask_points.py for the sampling and
why it keeps the full-map semantics); an ROI with at most that many pixels (every ROI when it is 0) is
evaluated exactly.

Which matches feed which term follows the official code: classification and masks use each output's own
Hungarian matches; boxes and FGL/DDF use the GO-LSD union over final, auxiliary, pre and encoder matches;
denoising outputs use their fixed positive queries. Suffixes: `_aux_i`, `_pre`, `_enc_i`, `_dn_i`, `_dn_pre`.

The returned dict also holds `num_sanitized` (not a loss: use `total_loss` to sum): the number of
predicted queries with a non-finite logit/box/corner or a non-positive width/height, of matched queries
with non-finite mask logits (counted once per loss term that uses them), plus such GT boxes. They
are repaired (non-finite -> 0, sizes clamped at 0 for IoU) so such a batch never crashes the step.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from dfineseg.loss.box_ops import box_convert, paired_iou, xyxy_clamped
from dfineseg.loss.fdr import fdr_targets
from dfineseg.loss.functions import (
    box_losses,
    ddf_loss,
    fgl_loss,
    point_mask_losses,
    position_supervised_loss,
    vfl_loss,
)
from dfineseg.loss.mask_points import MaskSource, roi_bounds, roi_points
from dfineseg.loss.matcher import HungarianMatcher, Indices, downsample_masks, union_of_matches
from dfineseg.loss.terms import DEFAULT_TERM_WEIGHTS, term_weights

_SUFFIX = re.compile(r"_(aux_\d+|pre|enc_\d+|dn_\d+|dn_pre)$")


# ------------------------------------------------------------------ helpers
def _world_mean(value: float, device: torch.device) -> float:
    """Average of a per-rank count over DDP ranks (the count itself without DDP), at least 1."""
    t = torch.tensor([float(value)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return max(float(t.item()), 1.0)


_MASK_KEYS = ("pred_masks", "mask_embed", "mask_pixels")


def _to_fp32(obj: Any) -> Any:
    """Floating tensors -> float32, except the mask tensors: casting every layer's [B,Q,H/4,W/4] maps (or
    one copy of the shared pixel features per layer) would be wasted, so `MaskSource` casts what it uses."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: (v if k in _MASK_KEYS else _to_fp32(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_fp32(v) for v in obj)
    return obj


def _per_edge(x: torch.Tensor) -> torch.Tensor:
    """[B,Q] per query -> [B*Q*4] per box edge, in the order of `pred_corners.reshape(-1, R + 1)`."""
    return x.unsqueeze(-1).expand(*x.shape, 4).reshape(-1)


def _no_masks(out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in out.items() if k not in _MASK_KEYS}


def _src_idx(indices: Indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    src = torch.cat([src for src, _ in indices]).to(device)
    return batch, src


def _gather_targets(targets: list[dict[str, Any]], indices: Indices, key: str) -> torch.Tensor:
    return torch.cat([t[key][tgt.to(t[key].device)] for t, (_, tgt) in zip(targets, indices)])


# ------------------------------------------------------------------ the criterion
class DFINESegCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weights: dict[str, float] | None = None,
        alpha: float = 0.75,
        gamma: float = 2.0,
        task: str = "segment",
        position_supervised: bool = False,
        ddf_temperature: float = 5.0,
        mask_points: int = 12544,
        mask_oversample: float = 3.0,
        mask_importance: float = 0.75,
    ) -> None:
        super().__init__()
        if task not in ("segment", "detect"):
            raise ValueError(f"task must be 'segment' or 'detect', got {task!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        unknown = sorted(set(weights or {}) - set(DEFAULT_TERM_WEIGHTS))
        if unknown:  # a misspelt name would otherwise leave its term at the default weight, unnoticed
            raise ValueError(f"unknown loss term(s) {unknown}; the terms are {sorted(DEFAULT_TERM_WEIGHTS)}")
        self.weights = {**DEFAULT_TERM_WEIGHTS, **(weights or {})}
        self.alpha = alpha
        self.gamma = gamma
        self.task = task
        self.position_supervised = position_supervised
        self.ddf_temperature = ddf_temperature
        if mask_oversample < 1 or not 0 <= mask_importance <= 1:
            raise ValueError(
                f"loss.mask_oversample must be >= 1 and loss.mask_importance in [0, 1], got "
                f"{mask_oversample} and {mask_importance}"
            )
        self.mask_points = mask_points
        self.mask_oversample = mask_oversample
        self.mask_importance = mask_importance

    # ---------------------------------------------------------- entry point
    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        # The loss runs in fp32 even inside an autocast region (fp16 logits overflow the BCE and the KL).
        with torch.autocast(device_type=device.type, enabled=False):
            return self._forward(_to_fp32(outputs), targets, device)

    def _forward(self, outputs: dict[str, Any], targets: list[dict[str, Any]], device: torch.device):
        counter: list[torch.Tensor] = []
        main = self._sanitize(outputs, counter)
        aux = [self._sanitize(o, counter) for o in outputs.get("aux_outputs") or []]
        # Masks are supervised (and matched) on the final, auxiliary and denoising layers only (D-FINE-seg
        # section 3.3); pre (= layer 0) and encoder outputs are matched and supervised on class and box.
        pre = (
            self._sanitize(_no_masks(outputs["pre_outputs"]), counter) if outputs.get("pre_outputs") else None
        )
        # With query_selection=mask (Mask DINO) the encoder's selected tokens carry masks, supervised too.
        enc_masks = bool((outputs.get("enc_meta") or {}).get("masks", False))
        enc = [self._sanitize(o if enc_masks else _no_masks(o), counter) for o in outputs.get("enc_aux_outputs") or []]
        dn = [self._sanitize(o, counter) for o in outputs.get("dn_outputs") or []]
        dn_pre = (
            self._sanitize(_no_masks(outputs["dn_pre_outputs"]), counter)
            if outputs.get("dn_pre_outputs")
            else None
        )
        up, reg_scale = outputs.get("up"), outputs.get("reg_scale")

        mask_size = MaskSource(main).size if self._segment(main) else None
        tgts = self._prepare_targets(targets, device, mask_size, counter)
        agnostic = bool((outputs.get("enc_meta") or {}).get("class_agnostic", False))
        enc_tgts = [{**t, "labels": torch.zeros_like(t["labels"])} for t in tgts] if agnostic else tgts

        own = self.matcher(main, tgts)
        own_aux = [self.matcher(o, tgts) for o in aux]
        own_pre = self.matcher(pre, tgts) if pre is not None else None
        own_enc = [self.matcher(o, enc_tgts) for o in enc]
        # The union (GO-LSD) is over outputs of the decoder's queries; an output over another token set (the
        # first selection of decoder_balance=di) is matched, and box-supervised, on its own.
        queries = main["pred_logits"].shape[1]
        same = [o["pred_logits"].shape[1] == queries for o in enc]
        go = union_of_matches([own, *own_aux, *([own_pre] if own_pre is not None else []),
                               *(m for m, s in zip(own_enc, same, strict=True) if s)])

        num_boxes = _world_mean(sum(len(t["labels"]) for t in tgts), device)
        num_go = _world_mean(sum(len(q) for q, _ in go), device)
        # DDF mixes its matched/unmatched means by sqrt counts, scaled to a per-GPU batch of 8 as the official code.
        batch, queries = main["pred_logits"].shape[:2]
        n_pos = 4 * sum(len(q) for q, _ in go)
        n_neg = 4 * batch * queries - n_pos
        ddf_mix = (math.sqrt(n_pos * 8 / batch), math.sqrt(n_neg * 8 / batch))

        ctx = {"up": up, "reg_scale": reg_scale, "ddf_mix": ddf_mix, "counter": counter}
        losses: dict[str, torch.Tensor] = {}
        losses.update(self._terms(main, tgts, own, go, num_boxes, num_go, ctx, ""))
        for i, (o, m) in enumerate(zip(aux, own_aux)):
            losses.update(self._terms(o, tgts, m, go, num_boxes, num_go, ctx, f"_aux_{i}"))
        if pre is not None:
            losses.update(self._terms(pre, tgts, own_pre, go, num_boxes, num_go, ctx, "_pre"))
        for i, (o, m, s) in enumerate(zip(enc, own_enc, same, strict=True)):
            box_idx, n_box = (go, num_go) if s else (m, num_boxes)
            losses.update(self._terms(o, enc_tgts, m, box_idx, num_boxes, n_box, ctx, f"_enc_{i}"))

        dn_meta = outputs.get("dn_meta")
        if dn and dn_meta is not None and dn_meta.get("dn_positive_idx") is not None:
            dn_idx = self._dn_indices(dn_meta, tgts)
            num_dn = max(num_boxes * dn_meta["dn_num_group"], 1.0)
            for i, o in enumerate(dn):
                losses.update(self._terms(o, tgts, dn_idx, dn_idx, num_dn, num_dn, ctx, f"_dn_{i}"))
            if dn_pre is not None:
                losses.update(self._terms(dn_pre, tgts, dn_idx, dn_idx, num_dn, num_dn, ctx, "_dn_pre"))

        losses["num_sanitized"] = (
            torch.stack(counter).sum().float() if counter else torch.zeros((), device=device)
        )
        return losses

    # ---------------------------------------------------------- per-output terms
    def _segment(self, out: dict[str, Any]) -> bool:
        return self.task == "segment" and MaskSource.present(out)

    def _terms(
        self, out, tgts, cls_idx: Indices, box_idx: Indices, num_cls: float, num_box: float, ctx, suffix: str
    ):
        device = out["pred_logits"].device
        res: dict[str, torch.Tensor] = {}

        idx = _src_idx(cls_idx, device)
        labels = _gather_targets(tgts, cls_idx, "labels").to(device)
        gt = _gather_targets(tgts, cls_idx, "boxes").to(device)
        ious = paired_iou(xyxy_clamped(out["pred_boxes"][idx].detach()), box_convert(gt, "cxcywh", "xyxy"))
        if self.position_supervised:
            res["loss_psl"] = position_supervised_loss(
                out["pred_logits"], idx, labels, ious, num_cls, self.gamma
            )
        else:
            res["loss_vfl"] = vfl_loss(out["pred_logits"], idx, labels, ious, num_cls, self.alpha, self.gamma)

        bidx = _src_idx(box_idx, device)
        src = out["pred_boxes"][bidx]
        gt_box = _gather_targets(tgts, box_idx, "boxes").to(device)
        res["loss_bbox"], res["loss_giou"] = box_losses(src, gt_box, num_box)

        if out.get("pred_corners") is not None and out.get("ref_points") is not None:
            res.update(self._local(out, bidx, gt_box, num_box, ctx))

        if self._segment(out):
            res["loss_mask_bce"], res["loss_mask_dice"] = self._masks(out, tgts, cls_idx, ctx["counter"])

        return {k + suffix: v * self.weights[k] for k, v in res.items()}

    def _local(self, out, bidx, gt_box: torch.Tensor, num_box: float, ctx) -> dict[str, torch.Tensor]:
        corners_all = out["pred_corners"]
        bins = corners_all.shape[-1] // 4
        reg_max = bins - 1
        gt_xyxy = box_convert(gt_box, "cxcywh", "xyxy")
        ious = paired_iou(xyxy_clamped(out["pred_boxes"][bidx].detach()), gt_xyxy)
        left, wl, wr = fdr_targets(
            out["ref_points"][bidx].detach(), gt_xyxy, reg_max, ctx["reg_scale"], ctx["up"]
        )
        res = {"loss_fgl": fgl_loss(corners_all[bidx].reshape(-1, bins), left, wl, wr, ious, num_box)}

        teacher = out.get("teacher_corners")
        if teacher is not None:
            corners = corners_all.reshape(-1, bins)
            teacher = teacher.reshape(-1, bins)
            if torch.equal(corners, teacher):  # the teacher layer itself
                res["loss_ddf"] = corners.sum() * 0
            else:
                weight = out["teacher_logits"].sigmoid().max(-1).values.detach().clone()
                matched = torch.zeros_like(weight, dtype=torch.bool)
                matched[bidx] = True
                weight[bidx] = ious.to(weight.dtype)
                res["loss_ddf"] = ddf_loss(
                    corners,
                    teacher,
                    _per_edge(weight),
                    _per_edge(matched),
                    *ctx["ddf_mix"],
                    self.ddf_temperature,
                )
        return res

    def _masks(
        self, out, tgts, cls_idx: Indices, counter: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = MaskSource(out)
        logits, target, boxes = [], [], []
        for b, (t, (q, g)) in enumerate(zip(tgts, cls_idx)):
            if t.get("masks_lowres") is None or len(q) == 0:
                continue
            keep = t["has_mask"][g.to(t["has_mask"].device)].to(q.device)
            q, g = q[keep], g[keep]
            if len(q) == 0:
                continue
            rows = src.rows(b, q)
            finite = torch.isfinite(rows)
            counter.append((~finite.all(-1)).sum())
            logits.append(torch.where(finite, rows, torch.zeros_like(rows)))
            target.append(t["masks_lowres"][g.to(t["masks_lowres"].device)].to(rows.device).flatten(1))
            boxes.append(t["boxes"][g.to(t["boxes"].device)].to(rows.device))
        if not logits:
            zero = src.zero()
            return zero, zero
        rows, tgt = torch.cat(logits), torch.cat(target)
        bounds = roi_bounds(torch.cat(boxes), src.size)
        idx, valid, area = roi_points(
            rows, bounds, src.size[1], self.mask_points, self.mask_oversample, self.mask_importance
        )
        return point_mask_losses(rows.gather(1, idx), tgt.gather(1, idx), valid, area)

    # ---------------------------------------------------------- inputs
    def _sanitize(self, out: dict[str, Any], counter: list[torch.Tensor]) -> dict[str, Any]:
        """Copy of an output dict with non-finite values zeroed; counts the affected queries.

        No host sync. Mask tensors are neither copied nor scanned here (that would cost more than the loss at
        640x640): the matcher caps non-finite costs and `_masks` repairs and counts the matched rows.
        """
        res = dict(out)
        logits = out["pred_logits"]
        bad = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
        for key in (
            "pred_logits",
            "pred_boxes",
            "pred_corners",
            "ref_points",
            "teacher_corners",
            "teacher_logits",
        ):
            x = out.get(key)
            if not isinstance(x, torch.Tensor):
                continue
            finite = torch.isfinite(x)
            if key in ("pred_logits", "pred_boxes", "pred_corners"):
                bad |= ~finite.all(-1)
            res[key] = torch.where(finite, x, torch.zeros_like(x))
        boxes = res["pred_boxes"]
        bad |= (boxes[..., 2] <= 0) | (boxes[..., 3] <= 0)
        counter.append(bad.sum())
        return res

    def _prepare_targets(
        self, targets, device, mask_size, counter: list[torch.Tensor]
    ) -> list[dict[str, Any]]:
        prepared = []
        for i, t in enumerate(targets):
            labels = t["labels"].to(device=device, dtype=torch.int64)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"target {i}: class label {int(labels.max()) if int(labels.max()) >= self.num_classes else int(labels.min())}"
                    f" outside 0..{self.num_classes - 1}; the model was built for {self.num_classes} classes"
                    " (check model.num_classes against the dataset's names)"
                )
            boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            finite = torch.isfinite(boxes)
            boxes = torch.where(finite, boxes, torch.zeros_like(boxes))
            # Counted, not dropped: a zero-size GT still has a class and a centre to learn from.
            counter.append((~finite.all(-1) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)).sum())
            entry: dict[str, Any] = {"labels": labels, "boxes": boxes, "masks_lowres": None}
            masks = t.get("masks")
            if mask_size is not None and masks is not None:
                entry["masks_lowres"] = downsample_masks(masks.to(device), mask_size)
                has_mask = t.get("has_mask")
                entry["has_mask"] = (
                    has_mask.to(device=device, dtype=torch.bool)
                    if has_mask is not None
                    else torch.ones(len(labels), dtype=torch.bool, device=device)
                )
            prepared.append(entry)
        return prepared

    @staticmethod
    def _dn_indices(dn_meta: dict[str, Any], tgts: list[dict[str, Any]]) -> Indices:
        groups = int(dn_meta["dn_num_group"])
        res = []
        for t, pos in zip(tgts, dn_meta["dn_positive_idx"]):
            n = len(t["labels"])
            gt = torch.arange(n, dtype=torch.int64).repeat(groups)
            pos = torch.as_tensor(pos, dtype=torch.int64).cpu()
            if len(pos) != len(gt):
                raise ValueError(
                    f"dn_meta: {len(pos)} positive denoising queries for {n} GTs x {groups} groups"
                )
            res.append((pos, gt))
        return res


def build_criterion(loss_cfg: Any, num_classes: int, task: str = "segment") -> DFINESegCriterion:
    """`LossConfig` -> criterion with its matcher."""
    return DFINESegCriterion(
        num_classes=num_classes,
        matcher=HungarianMatcher.from_config(loss_cfg, task),
        weights=term_weights(loss_cfg),
        alpha=loss_cfg.focal_alpha,
        gamma=loss_cfg.focal_gamma,
        task=task,
        position_supervised=loss_cfg.position_supervised_cls,
        mask_points=loss_cfg.mask_points,
        mask_oversample=loss_cfg.mask_oversample,
        mask_importance=loss_cfg.mask_importance,
    )


def total_loss(loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the weighted loss terms (keys starting with `loss_`; counters like `num_sanitized` excluded)."""
    terms = [v for k, v in loss_dict.items() if k.startswith("loss_")]
    if not terms:
        raise ValueError("loss dict holds no loss_* terms")
    return torch.stack(terms).sum()


def aggregate_losses(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per base name (`loss_vfl`, `loss_bbox`, ...) the sum over final/aux/pre/enc/dn outputs, plus `loss`
    (the total) and the counters, as floats for logging (one host sync)."""
    keys = list(loss_dict)
    if not keys:
        return {"loss": 0.0}
    dev = next((v.device for v in loss_dict.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    values = torch.stack(
        [torch.as_tensor(loss_dict[k], device=dev).detach().float().reshape(()) for k in keys]
    ).tolist()
    agg: dict[str, float] = {}
    for k, value in zip(keys, values):
        base = _SUFFIX.sub("", k) if k.startswith("loss_") else k
        agg[base] = agg.get(base, 0.0) + value
    agg["loss"] = sum(v for k, v in agg.items() if k.startswith("loss_"))
    return agg
