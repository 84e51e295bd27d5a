"""D-FINE-seg: HGNetv2 + HybridEncoder + D-FINE decoder (+ mask head for `task=segment`).

The detection part (`backbone`, `decoder`, `encoder`) has exactly the official D-FINE state_dict keys
and shapes; the mask head lives under `mask_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfineseg.infer.boxes import box_convert
from dfineseg.model.decoder import DFINEDecoder
from dfineseg.model.encoder import HybridEncoder
from dfineseg.model.hgnetv2 import ARCHS, HGNetv2
from dfineseg.model.mask_head import MaskHead


@dataclass(frozen=True)
class SizeSpec:
    backbone: str
    use_lab: bool
    frozen_stem_bn: bool  # L/X: frozen stem and FrozenBatchNorm in the backbone (official)
    return_idx: tuple[int, ...]
    in_channels: tuple[int, ...]
    strides: tuple[int, ...]
    enc_hidden: int
    enc_ffn: int
    encoder_idx: int
    expansion: float
    depth_mult: float
    dec_hidden: int
    dec_ffn: int
    dec_layers: int
    points: tuple[int, ...]
    reg_scale: float
    heads: int = 8


SIZES: dict[str, SizeSpec] = {
    "n": SizeSpec("B0", True, False, (2, 3), (512, 1024), (16, 32), 128, 512, 1, 0.34, 0.5, 128, 512, 3, (6, 6), 4),
    "s": SizeSpec("B0", True, False, (1, 2, 3), (256, 512, 1024), (8, 16, 32), 256, 1024, 2, 0.5, 0.34,
                  256, 1024, 3, (3, 6, 3), 4),
    "m": SizeSpec("B2", True, False, (1, 2, 3), (384, 768, 1536), (8, 16, 32), 256, 1024, 2, 1.0, 0.67,
                  256, 1024, 4, (3, 6, 3), 4),
    "l": SizeSpec("B4", False, True, (1, 2, 3), (512, 1024, 2048), (8, 16, 32), 256, 1024, 2, 1.0, 1.0,
                  256, 1024, 6, (3, 6, 3), 4),
    "x": SizeSpec("B5", False, True, (1, 2, 3), (512, 1024, 2048), (8, 16, 32), 384, 2048, 2, 1.0, 1.0,
                  256, 1024, 6, (3, 6, 3), 8),
    # Tests and quick CPU demos: a narrow B0-like backbone, width 64, two decoder layers (~1 M parameters).
    "tiny": SizeSpec("T0", True, False, (1, 2, 3), (64, 128, 256), (8, 16, 32), 64, 128, 2, 0.5, 0.34,
                     64, 128, 2, (3, 6, 3), 4, heads=4),
}

MASK_STRIDE = 4


class DFINESeg(nn.Module):
    def __init__(self, size: str, num_classes: int, task: str = "segment", num_queries: int = 300,
                 num_denoising: int = 100, fpn_channels: int = 64, mask_channels: int = 64, embed_layers: int = 3,
                 depthwise_mask: bool = True, mask_norm: str = "bn", backbone: str = "hgnetv2",
                 lora_rank: int = 0, lora_targets: tuple[str, ...] = ("qkv", "proj"), memory_fusion: str = "none",
                 query_selection: str = "box", decoder_balance: str = "none"):
        super().__init__()
        if query_selection not in ("box", "mask") or (query_selection == "mask" and task != "segment"):
            raise ValueError(f"query_selection={query_selection!r}: 'box', or 'mask' for a segment model")
        self.query_selection = query_selection
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
        if task not in ("detect", "segment"):
            raise ValueError(f"model.task must be 'detect' or 'segment', got {task!r}")
        spec = SIZES[size]
        self.size = size
        self.task = task
        self.num_classes = num_classes
        self.spec = spec
        # The mask head needs a stride-8 map; N's encoder starts at stride 16, so N also returns stage 1.
        self.mask_from_backbone = task == "segment" and spec.strides[0] != 8
        bb_idx = tuple(sorted(set(spec.return_idx) | ({1} if self.mask_from_backbone else set())))
        # Registration order backbone, decoder, encoder = the official state_dict order.
        self.backbone_name = backbone
        if backbone == "hgnetv2":
            self.backbone = HGNetv2(spec.backbone, use_lab=spec.use_lab, return_idx=bb_idx,
                                    freeze_stem=spec.frozen_stem_bn, freeze_norm=spec.frozen_stem_bn)
        elif backbone.startswith("dinov2_"):
            from dfineseg.model.dinov2 import DinoV2Backbone

            # The widths of the HGNetv2 stages it replaces, so the encoder and mask head stay the size's.
            widths = [stage.out_ch for stage in ARCHS[spec.backbone][1]]
            self.backbone = DinoV2Backbone(backbone, widths, bb_idx, lora_rank=lora_rank,
                                           lora_targets=tuple(lora_targets))
        else:
            raise ValueError(f"unknown backbone {backbone!r}; choose hgnetv2, dinov2_s or dinov2_b")
        self.decoder = DFINEDecoder(
            num_classes, spec.dec_hidden, [spec.enc_hidden] * len(spec.strides), list(spec.strides),
            list(spec.points), spec.dec_layers, nhead=spec.heads, dim_feedforward=spec.dec_ffn,
            num_queries=num_queries, num_denoising=num_denoising, reg_scale=spec.reg_scale,
            decoder_balance=decoder_balance)
        self.encoder = HybridEncoder(
            list(spec.in_channels), list(spec.strides), spec.enc_hidden, nhead=spec.heads,
            dim_feedforward=spec.enc_ffn, use_encoder_idx=(spec.encoder_idx,), expansion=spec.expansion,
            depth_mult=spec.depth_mult, memory_fusion=memory_fusion)
        if task == "segment":
            mask_in = [spec.enc_hidden] * len(spec.strides)
            if self.mask_from_backbone:
                mask_in = [self.backbone.out_channels[1], *mask_in]
            self.mask_head = MaskHead(mask_in, spec.dec_hidden, fpn_channels, mask_channels, embed_layers,
                                      depthwise_mask, mask_norm)

    # ------------------------------------------------------------------ parts
    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """-> (PAN outputs, mask-head inputs stride 8/16/32 or None for detect)."""
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"input height and width must be multiples of 32, got {h}x{w}")
        bb = dict(zip(self.backbone.return_idx, self.backbone(images), strict=True))
        pan = self.encoder([bb[i] for i in self.spec.return_idx])
        if self.task != "segment":
            return pan, None
        return pan, ([bb[1], *pan] if self.mask_from_backbone else pan)

    def decode(self, pan: list[torch.Tensor], mask_in: list[torch.Tensor] | None,
               targets: list[dict[str, torch.Tensor]] | None = None) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """Decoder outputs, extras and the mask head's pixel features (None for detect). With
        query_selection=mask the pixel features come first: the selected tokens' masks give the anchors."""
        if mask_in is None:
            return (*self.decoder(pan, targets), None)
        if self.query_selection == "mask":
            pixels = self.mask_head.pixel_features(mask_in)
            out, extras = self.decoder(pan, targets, select_masks=lambda h: self.mask_head.mask_logits(h, pixels))
            if self.training:  # the encoder's selected tokens are supervised on masks too (Mask DINO)
                enc = out["enc_aux_outputs"][0]
                enc["mask_embed"], enc["mask_pixels"] = self.mask_head.scaled_embedding(extras["enc_memory"]), pixels
                out["enc_meta"]["masks"] = True
            return out, extras, pixels
        out, extras = self.decoder(pan, targets)
        return out, extras, self.mask_head.pixel_features(mask_in)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        pan, mask_in = self.features(images)
        out, extras, pixels = self.decode(pan, mask_in, targets)
        if pixels is None:
            return out
        if not self.training:
            out["pred_masks"] = self.mask_head.mask_logits(extras["hidden"][-1], pixels)
            return out
        # Training never builds [B,Q,H/4,W/4] logits for every layer: each supervised output carries its
        # query embeddings and the shared pixel features, and the matcher and the mask losses evaluate
        # logits = embedding . pixel feature only for the queries and pixels they use
        # (dfineseg/loss/mask_points.py). pre (= layer 0), encoder and dn_pre outputs get no masks: the
        # criterion supervises masks on the final, auxiliary and denoising layers only.
        embeds = self.mask_head.scaled_embedding(extras["hidden"])  # [L',B,Q,C]
        out["mask_embed"], out["mask_pixels"] = embeds[-1], pixels
        for i, aux in enumerate(out.get("aux_outputs", [])):
            aux["mask_embed"], aux["mask_pixels"] = embeds[i], pixels
        if "dn_hidden" in extras:
            dn_embeds = self.mask_head.scaled_embedding(extras["dn_hidden"])
            for i, dn in enumerate(out["dn_outputs"]):
                dn["mask_embed"], dn["mask_pixels"] = dn_embeds[i], pixels
        return out


class DeployModel(nn.Module):
    """The exported graph: images [B,3,H,W] RGB 0..1 -> (scores [B,K], labels int64 [B,K], boxes [B,K,4] xyxy
    normalised, and for segment mask_features [B,H/4,W/4,C] + mask_embed [B,K,C]). Top-K over queries by their
    best class score. A mask logit is `mask_embed[k] . mask_features[pixel]` (`MaskHead.mask_logits`); the
    product is left to post-processing, which takes it only for kept detections (dfineseg.infer.graph)."""

    def __init__(self, model: DFINESeg, topk: int = 100):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.model = model.eval()
        self.topk = topk

    def train(self, mode: bool = True) -> DeployModel:  # noqa: ARG002  (deployment is always eval)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        pan, mask_in = m.features(images)
        out, extras, pixels = m.decode(pan, mask_in)
        probs = out["pred_logits"].sigmoid()
        best, labels = probs.max(-1)
        k = min(self.topk, int(best.shape[1]))
        scores, idx = best.topk(k, dim=1)
        labels = labels.gather(1, idx)
        boxes = out["pred_boxes"].gather(1, idx[..., None].expand(-1, -1, 4))
        boxes = box_convert(boxes, "cxcywh", "xyxy")
        if mask_in is None:
            return scores, labels, boxes
        hidden = extras["hidden"][-1]
        hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        embed = m.mask_head.scaled_embedding(hidden)
        return scores, labels, boxes, pixels.permute(0, 2, 3, 1), embed


def build_model(model_cfg: Any, num_classes: int) -> DFINESeg:
    """Build from a `dfineseg.config.ModelConfig` (weights are loaded separately, see `weights.py`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    mh = model_cfg.mask_head
    fpn_channels, mask_channels = mask_head_widths(model_cfg)
    model = DFINESeg(
        model_cfg.size, num_classes, model_cfg.task, num_queries=model_cfg.num_queries,
        num_denoising=model_cfg.num_denoising, fpn_channels=fpn_channels, mask_channels=mask_channels,
        embed_layers=mh.embed_layers, depthwise_mask=mh.depthwise, mask_norm=mh.norm,
        backbone=getattr(model_cfg, "backbone", "hgnetv2"), lora_rank=lora_rank(model_cfg),
        lora_targets=tuple(model_cfg.lora.targets) if hasattr(model_cfg, "lora") else ("qkv", "proj"),
        memory_fusion=memory_fusion(model_cfg),
        query_selection=getattr(model_cfg, "query_selection", "box"),
        decoder_balance=getattr(model_cfg, "decoder_balance", "none"))
    if getattr(model_cfg, "freeze_backbone", False):
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model


# Sizes whose default is the dense memory fusion: it raised N's mask F1 by 0.05 at no measured latency cost, but
# costs S 10-13 % (its stride-8 projection grows with the hidden width): docs/BENCHMARKS.md, "The dense memory
# fusion by size".
DENSE_FUSION_SIZES = ("tiny", "n")


def memory_fusion(model_cfg: Any) -> str:
    """`model.memory_fusion`, its default (None) resolved by the model size."""
    value = getattr(model_cfg, "memory_fusion", "none")
    if value is None:
        return "dense" if model_cfg.size in DENSE_FUSION_SIZES else "none"
    return value


# Sizes whose mask head defaults to 32 channels (fusion and 1/4-resolution features) instead of 64: at N it cut
# INT8 latency at 640 by ~5 % (the mask head is ~10 % of N) for a held-out mask F1 change within seed noise
# (two seeds: float -0.006, INT8 +0.001): docs/BENCHMARKS.md, "The mask head's width at N". Not measured for tiny
# (the tests' size) or S and larger, which keep 64.
NARROW_MASK_HEAD_SIZES = ("n",)


def mask_head_widths(model_cfg: Any) -> tuple[int, int]:
    """`model.mask_head` (fpn_channels, mask_channels), a default (None) resolved by the model size."""
    default = 32 if model_cfg.size in NARROW_MASK_HEAD_SIZES else 64
    mh = model_cfg.mask_head
    return (default if mh.fpn_channels is None else mh.fpn_channels,
            default if mh.mask_channels is None else mh.mask_channels)


def resolve_size_defaults(model_cfg: Any) -> None:
    """Write the size-dependent defaults (None in the schema) into `model_cfg`, so a run saves what it built and
    its checkpoint rebuilds the same model whatever the defaults become."""
    model_cfg.memory_fusion = memory_fusion(model_cfg)
    model_cfg.mask_head.fpn_channels, model_cfg.mask_head.mask_channels = mask_head_widths(model_cfg)


def lora_rank(model_cfg: Any) -> int:
    """LoRA on a DINOv2 backbone only when it starts from pretrained weights (adapting random weights
    through a low-rank update while freezing them would be pointless)."""
    if not str(getattr(model_cfg, "backbone", "hgnetv2")).startswith("dinov2_"):
        return 0
    enabled = model_cfg.lora.enabled
    if enabled is None:
        enabled = bool(getattr(model_cfg, "backbone_weights", None))
    return int(model_cfg.lora.rank) if enabled else 0


def count_parameters(module: nn.Module) -> int:
    """All parameters, shared ones once, frozen ones included (the official counting)."""
    return sum(p.numel() for p in module.parameters())
