"""The loss terms' one table: names, config keys and the papers' default weights.

Each entry is one weight a user sets under `loss:` in a config (`loss.l1=5`) and the names of the terms it
multiplies, as the criterion returns them (`loss_bbox`, plus `_aux_i`/`_pre`/`_enc_i`/`_dn_i`/`_dn_pre` per
output) and as the run folder records them (`train/loss_bbox` in results.csv and TensorBoard). Everything
else reads the names and defaults from here: the config schema generates its weight fields from this table,
the criterion its default weights, the results plot its panels.

Plain Python on purpose: `dfineseg.config` imports this module and must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossWeight:
    key: str  # under `loss:` in a config; generated as a `LossConfig` field
    default: float  # the papers' value (D-FINE, D-FINE-seg)
    terms: tuple[str, ...]  # the criterion's names of the terms it multiplies
    help: str
    plot: bool = True  # drawn in the run folder's results.png


LOSS_WEIGHTS: tuple[LossWeight, ...] = (
    # One weight, two names: `loss.position_supervised_cls` swaps VFL for the Stable-DINO loss, and the two
    # must not share a name (a results.csv column would then mean two different losses).
    LossWeight("vfl", 1.0, ("loss_vfl", "loss_psl"),
               "classification: VFL, or the position-supervised loss with position_supervised_cls"),
    LossWeight("l1", 5.0, ("loss_bbox",), "L1 on the matched boxes (cxcywh)"),
    LossWeight("giou", 2.0, ("loss_giou",), "1 - GIoU of the matched boxes"),
    LossWeight("fgl", 0.15, ("loss_fgl",), "fine-grained localisation of the box edges' bin distributions"),
    LossWeight("ddf", 1.5, ("loss_ddf",), "decoupled distillation from the last decoder layer", plot=False),
    LossWeight("mask_bce", 1.0, ("loss_mask_bce",), "mask BCE inside the GT box"),
    LossWeight("mask_dice", 1.0, ("loss_mask_dice",), "mask dice inside the GT box"),
)

# Loss name -> the `loss:` key of its weight, and -> the default weight.
WEIGHT_KEY: dict[str, str] = {name: w.key for w in LOSS_WEIGHTS for name in w.terms}
DEFAULT_TERM_WEIGHTS: dict[str, float] = {name: w.default for w in LOSS_WEIGHTS for name in w.terms}
PLOTTED_TERMS: tuple[str, ...] = tuple(name for w in LOSS_WEIGHTS if w.plot for name in w.terms)


def term_weights(loss_cfg: object) -> dict[str, float]:
    """Loss name -> weight from a `LossConfig` (or anything with the table's keys as attributes)."""
    return {name: float(getattr(loss_cfg, key)) for name, key in WEIGHT_KEY.items()}
