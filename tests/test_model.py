"""Model forward contracts: training dict layout, eval outputs, DeployModel, non-square inputs, gradients."""

from __future__ import annotations

import pytest
import torch

from dfineseg.config import ModelConfig
from dfineseg.infer.boxes import box_convert
from dfineseg.model import DeployModel, DFINESeg, build_model
from dfineseg.model.encoder import sincos_position_embedding


def _targets(counts: list[int], num_classes: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return out


@pytest.fixture(scope="module")
def tiny_seg() -> DFINESeg:
    torch.manual_seed(0)
    return build_model(ModelConfig(size="tiny", task="segment", num_queries=60, num_denoising=20), num_classes=3)


def test_training_outputs_follow_the_dfine_layout(tiny_seg: DFINESeg) -> None:
    model = tiny_seg.train()
    h, w = 96, 128
    out = model(torch.rand(2, 3, h, w), _targets([3, 0], 3))
    q, c, bins = 60, 3, 4 * 33
    assert out["pred_logits"].shape == (2, q, c)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert out["pred_corners"].shape == (2, q, bins)
    assert out["ref_points"].shape == (2, q, 4)
    # Training carries mask embeddings + the shared pixel features, not [B,Q,h,w] logits per layer.
    assert "pred_masks" not in out
    assert out["mask_embed"].shape == (2, q, 64)
    assert out["mask_pixels"].shape == (2, 64, h // 4, w // 4)
    assert float(out["up"]) == 0.5 and float(out["reg_scale"]) == 4.0
    assert len(out["aux_outputs"]) == 1  # 2 decoder layers -> 1 auxiliary
    aux = out["aux_outputs"][0]
    assert set(aux) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "teacher_corners",
                        "teacher_logits", "mask_embed", "mask_pixels"}
    assert aux["mask_pixels"] is out["mask_pixels"]
    assert torch.equal(aux["teacher_corners"], out["pred_corners"])
    assert torch.equal(aux["teacher_logits"], out["pred_logits"])
    # Masks are not supervised on pre/encoder/dn_pre outputs, so they carry none.
    assert set(out["pre_outputs"]) == {"pred_logits", "pred_boxes"}
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, q, c)
    assert set(out["enc_aux_outputs"][0]) == {"pred_logits", "pred_boxes"}
    assert out["enc_meta"] == {"class_agnostic": False}
    # Denoising: max 3 GT -> 20 // 3 = 6 groups of 3 positives + 3 negatives.
    meta = out["dn_meta"]
    assert meta["dn_num_group"] == 6 and meta["dn_num_split"] == [36, q]
    assert len(meta["dn_positive_idx"]) == 2 and meta["dn_positive_idx"][1].numel() == 0
    assert meta["dn_positive_idx"][0].tolist()[:4] == [0, 1, 2, 6]
    assert len(out["dn_outputs"]) == 2
    assert out["dn_outputs"][-1]["mask_embed"].shape == (2, 36, 64)
    assert "mask_embed" not in out["dn_pre_outputs"]
    assert out["dn_pre_outputs"]["pred_boxes"].shape == (2, 36, 4)
    boxes = out["pred_boxes"]
    assert torch.isfinite(boxes).all() and (boxes[..., 2:] >= 0).all()


def test_training_without_any_ground_truth_keeps_the_layout(tiny_seg: DFINESeg) -> None:
    out = tiny_seg.train()(torch.rand(1, 3, 64, 64), _targets([0], 3))
    assert out["dn_meta"]["dn_num_split"] == [0, out["pred_logits"].shape[1]]
    assert out["dn_outputs"][0]["pred_logits"].shape[1] == 0


def test_gradients_reach_every_trainable_parameter(tiny_seg: DFINESeg) -> None:
    model = DFINESeg("tiny", 3, "segment", num_queries=40, num_denoising=20).train()
    with torch.no_grad():
        # Zero-initialised heads (box heads, LQE, gate) block gradients to the layers before them at step 0;
        # give them small values so the test checks connectivity, not the initialisation.
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.01)
    out = model(torch.rand(2, 3, 64, 96), _targets([2, 1], 3))

    def tensors(d: dict) -> list[torch.Tensor]:
        return [v for k, v in d.items() if k.startswith(("pred_", "mask_")) and isinstance(v, torch.Tensor)]

    terms = tensors(out) + tensors(out["pre_outputs"]) + tensors(out["dn_pre_outputs"])
    for group in ("aux_outputs", "enc_aux_outputs", "dn_outputs"):
        for d in out[group]:
            terms += tensors(d)
    sum(t.float().square().mean() for t in terms).backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unreached == []
    # A learnable-affine bias feeding conv + BatchNorm (train mode) has an exactly zero gradient: BN removes
    # any constant shift. Every other gradient must be non-zero.
    zero = [n for n, p in model.named_parameters()
            if p.requires_grad and not p.grad.any() and not n.endswith(".lab.bias")]
    assert zero == []


def test_eval_outputs_and_deploy_model_contract(tiny_seg: DFINESeg) -> None:
    model = tiny_seg.eval()
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        out = model(x)
        scores, labels, boxes, features, embed = DeployModel(model, topk=10)(x)
    assert set(out) == {"pred_logits", "pred_boxes", "pred_masks"}
    assert scores.shape == (2, 10) and labels.shape == (2, 10) and labels.dtype == torch.int64
    assert boxes.shape == (2, 10, 4) and features.shape[:3] == (2, 24, 40) and embed.shape == (2, 10, features.shape[3])
    masks = torch.einsum("bkc,bhwc->bkhw", embed, features)  # the product post-processing takes
    probs = out["pred_logits"].sigmoid()
    best, best_label = probs.max(-1)
    top, idx = best.topk(10, dim=1)
    torch.testing.assert_close(scores, top)
    assert torch.equal(labels, best_label.gather(1, idx))
    want_boxes = box_convert(out["pred_boxes"].gather(1, idx[..., None].expand(-1, -1, 4)), "cxcywh", "xyxy")
    torch.testing.assert_close(boxes, want_boxes)
    want_masks = out["pred_masks"].gather(1, idx[:, :, None, None].expand(-1, -1, 24, 40))
    torch.testing.assert_close(masks, want_masks, atol=1e-5, rtol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_training_embeddings_reproduce_the_eval_mask_logits(tiny_seg: DFINESeg) -> None:
    """The training forward's embedding . pixel product is exactly the eval/deploy mask logits: same weights,
    same input, BatchNorm frozen in both (eval statistics) so only the output format differs."""
    model = tiny_seg
    x = torch.rand(2, 3, 64, 96)
    model.eval()
    with torch.no_grad():
        want = model(x)["pred_masks"]
        # The eval forward before training stopped building full maps: every layer's logits, the last kept.
        hidden = model.decoder(model.features(x)[0])[1]["hidden"]
        before = model.mask_head.mask_logits(hidden, model.mask_head.pixel_features(model.features(x)[1]))[-1]
    torch.testing.assert_close(want, before, rtol=0, atol=0)
    model.train()
    for m in model.modules():  # BatchNorm in eval mode: the same normalisation as the eval forward
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.eval()
    b, c, h, w = out["mask_pixels"].shape
    got = (out["mask_embed"] @ out["mask_pixels"].reshape(b, c, h * w)).reshape(b, -1, h, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_detect_model_has_no_mask_head_and_deploys_three_outputs() -> None:
    model = build_model(ModelConfig(size="tiny", task="detect", num_queries=30), num_classes=2).eval()
    assert not hasattr(model, "mask_head")
    with torch.no_grad():
        outs = DeployModel(model, topk=50)(torch.rand(1, 3, 64, 64))
    assert len(outs) == 3 and outs[0].shape == (1, 30)  # K is capped by the number of queries


@pytest.mark.parametrize("size", ["n", "s"])
def test_official_sizes_segment_at_small_non_square_input(size: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=size, task="segment", num_queries=40), num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 128))
    assert out["pred_logits"].shape == (1, 40, 5)
    assert out["pred_boxes"].shape == (1, 40, 4)
    # Masks at 1/4 for every size, N included (its PAN starts at stride 16).
    assert out["pred_masks"].shape == (1, 40, 16, 32)


def test_input_must_be_a_multiple_of_32(tiny_seg: DFINESeg) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_seg.eval()(torch.rand(1, 3, 80, 96))


def _official_sincos(w: int, h: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The official w-major construction, written out for the comparison."""
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ow = gw.flatten()[:, None] * omega[None]
    oh = gh.flatten()[:, None] * omega[None]
    return torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], 1)[None]


def test_position_embedding_matches_official_on_square_and_is_consistent_on_non_square() -> None:
    torch.testing.assert_close(sincos_position_embedding(5, 5, 16), _official_sincos(5, 5, 16), rtol=0, atol=0)
    h, w, dim = 3, 7, 16
    emb = sincos_position_embedding(h, w, dim)[0]
    square = sincos_position_embedding(7, 7, dim)[0]
    # Token (y, x) of a row-major h x w map must carry the same code as (y, x) of a square map.
    for y in range(h):
        for x in range(w):
            torch.testing.assert_close(emb[y * w + x], square[y * 7 + x], rtol=0, atol=0)


def test_anchors_are_built_for_the_actual_non_square_size() -> None:
    dec = DFINESeg("tiny", 2, "detect").decoder
    logits, valid = dec.generate_anchors([(2, 4)])
    centres = logits[0, :, :2].sigmoid()
    # Row-major tokens: index y*W + x has centre ((x+.5)/W, (y+.5)/H).
    torch.testing.assert_close(centres[5], torch.tensor([1.5 / 4, 1.5 / 2]))
    assert valid.shape == (1, 8, 1)


def test_mask_head_widths_and_norm_come_from_the_config() -> None:
    cfg = ModelConfig(size="tiny", task="segment", num_queries=20,
                      mask_head={"fpn_channels": 32, "mask_channels": 48, "embed_layers": 2, "norm": "gn",
                                 "depthwise": False})
    model = build_model(cfg, num_classes=2).eval()
    head = model.mask_head
    assert head.fuse.conv.out_channels == 32 and isinstance(head.fuse.norm, torch.nn.GroupNorm)
    assert head.refine.conv.kernel_size == (3, 3) and head.refine.conv.out_channels == 48
    assert len(head.embed) == 2 and head.embed[-1].out_features == 48
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))["pred_masks"].shape == (1, 20, 16, 16)


def test_size_n_feeds_a_stride_8_backbone_map_to_the_mask_head() -> None:
    model = DFINESeg("n", 2, "segment")
    assert model.backbone.return_idx == (1, 2, 3)  # stage 1 (stride 8) added for the mask head only
    assert model.mask_head.lateral[0].conv.in_channels == 256  # B0 stage 1 width
    assert DFINESeg("n", 2, "detect").backbone.return_idx == (2, 3)
