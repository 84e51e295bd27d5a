"""The seeds' techniques as switches (issue: seed techniques): each one's mechanism, and that it trains and
exports with parity. `model.memory_fusion=dense` (Stable-DINO, seed 004 section 3)."""

from __future__ import annotations

import json

import torch

from dfineseg.model import DFINESeg
from dfineseg.model.encoder import HybridEncoder


def _encoder(fusion: str) -> HybridEncoder:
    torch.manual_seed(0)
    return HybridEncoder([16, 32, 64], [8, 16, 32], hidden_dim=32, nhead=2, dim_feedforward=64,
                         use_encoder_idx=(2,), memory_fusion=fusion).eval()


def test_dense_fusion_reads_backbone_fpn_and_pan_features_of_each_level():
    plain, fused = _encoder("none"), _encoder("dense")
    fused.load_state_dict(plain.state_dict(), strict=False)  # the same encoder, plus the fusion
    feats = [torch.rand(1, 16, 16, 16), torch.rand(1, 32, 8, 8), torch.rand(1, 64, 4, 4)]
    hidden = 32
    with torch.no_grad():
        pan = plain(feats)
        backbone = [p(f) for p, f in zip(plain.input_proj, feats, strict=True)]
        for block in fused.fusion:  # pick one of the three concatenated parts: [backbone | FPN | PAN]
            block.norm.reset_parameters()
            block.norm.reset_running_stats()
        for part, expected in ((2, pan), (0, backbone)):
            for block in fused.fusion:
                w = torch.zeros(hidden, 3 * hidden, 1, 1)
                w[:, part * hidden:(part + 1) * hidden, 0, 0] = torch.eye(hidden)
                block.conv.weight.copy_(w)
            out = fused(feats)
            for got, want in zip(out, expected, strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not any(k.startswith("fusion.") for k in plain.state_dict())  # off: the official keys only


def test_finest_level_fusion_in_eval_mode_is_the_three_part_projection():
    """At the finest level the PAN output is the FPN output: in eval mode the encoder convolves
    [backbone | map] with the two weight slices summed. It must compute the three-part projection."""
    fused = _encoder("dense").double()  # float64: the two sums differ only by rounding
    with torch.no_grad():
        for block in fused.fusion:  # trained-looking statistics: identity ones would hide a wrong fold
            block.norm.running_mean.uniform_(-1, 1)
            block.norm.running_var.uniform_(0.5, 2)
            block.norm.weight.uniform_(0.5, 1.5)
    fused.eval()
    feats = [torch.rand(2, 16, 16, 16), torch.rand(2, 32, 8, 8), torch.rand(2, 64, 4, 4)]
    feats = [f.double() for f in feats]
    captured = {}

    def keep(name):
        return lambda module, args, out: captured.__setitem__(name, out)

    fused.fpn_blocks[-1].register_forward_hook(keep("finest"))
    fused.input_proj[0].register_forward_hook(keep("backbone"))
    with torch.no_grad():
        out = fused(feats)
        three = torch.cat([captured["backbone"], captured["finest"], captured["finest"]], dim=1)
        torch.testing.assert_close(out[0], fused.fusion[0](three), atol=1e-10, rtol=1e-10)
        fused.train()  # training keeps the three-part form (batch statistics)
        out = fused(feats)
        three = torch.cat([captured["backbone"], captured["finest"], captured["finest"]], dim=1)
        torch.testing.assert_close(out[0], fused.fusion[0](three), atol=1e-10, rtol=1e-10)
    assert fused.fusion[0].conv.weight.shape[1] == 3 * 32  # checkpoints keep the three-part layout


def test_dense_fusion_model_trains_and_exports_with_parity(small_data, tmp_path):
    model = _train_and_export(small_data, tmp_path, {"memory_fusion": "dense"})
    assert any(k.startswith("encoder.fusion.") for k in model.state_dict())


def _train_and_export(small_data, tmp_path, switches: dict):
    """Train the tiny model one epoch with `switches` under model:, export ONNX + OpenVINO with parity."""
    from dfineseg.config import build_config
    from dfineseg.model.checkpoint import config_from_checkpoint, load_checkpoint
    from dfineseg.train.trainer import Trainer

    cfg = build_config({
        "data": {"path": str(small_data), "imgsz": 64, "workers": 0,
                 "augment": {"mosaic": {"p": 0.0}, "affine": {"p": 0.0}}},
        "model": {"size": "tiny", "num_queries": 10, "num_denoising": 6, **switches},
        "eval": {"plots": False, "batch": 2},
        "train": {"epochs": 1, "batch": 2, "project": str(tmp_path), "name": "switch", "warmup_iters": 1,
                  "ema_warmup": 2, "seed": 0, "tensorboard": False, "plot_images": 0},
    })
    trainer = Trainer(cfg)
    best = trainer.fit()
    assert isinstance(trainer.model, DFINESeg)
    saved = config_from_checkpoint(load_checkpoint(best)).model
    assert all(getattr(saved, k) == v for k, v in switches.items())
    # The size-dependent default is resolved when the run starts and saved with it (tiny: dense).
    assert saved.memory_fusion == switches.get("memory_fusion", "dense")
    assert (saved.mask_head.fpn_channels, saved.mask_head.mask_channels) == (64, 64)  # tiny keeps 64
    export_passes_parity(best, small_data, tmp_path / "export")
    return trainer.model


def export_passes_parity(best, data, out, say=None):
    """Export a checkpoint to ONNX and OpenVINO (2 parity images) and require both to pass parity."""
    from dfineseg.export.api import export_model
    from dfineseg.model.checkpoint import config_from_checkpoint, load_checkpoint

    cfg = config_from_checkpoint(load_checkpoint(best))
    cfg.data.path = str(data)
    cfg.export.formats = ["onnx", "openvino"]
    cfg.export.out = str(out)
    cfg.export.parity_images = 2
    paths = export_model(best, cfg, say=say)
    summary = json.loads(paths["summary"].read_text())
    assert all(summary["artefacts"][k]["parity"]["passed"] for k in ("onnx", "openvino")), summary
    return paths


def test_ablation_table_reports_mean_and_sd_per_variant():
    from dfineseg.benchmarks.seed_ablation import _variant, table

    assert _variant("fusion=model.memory_fusion=dense,data.augment.mixup.p=0.5") == (
        "fusion", ["model.memory_fusion=dense", "data.augment.mixup.p=0.5"])
    assert _variant("default=") == ("default", [])
    rows = [{"variant": "default", "mask_f1": f, "box_f1": f, "mask_map50_95": 0.1, "s_per_step": 1.0}
            for f in (0.2, 0.4)]
    text = table(rows)
    assert "| default | 2 | 0.300 ± 0.141 |" in text


def test_ablation_base_is_the_short_budget_recipe_without_its_batch():
    from dfineseg.benchmarks.seed_ablation import base_keys
    from dfineseg.train.short_budget import RECIPE

    keys = base_keys("recipe")
    assert "model.num_queries=100" in keys and "train.warmup_iters=20" in keys
    assert len(keys) == len(RECIPE) - 1 and not any(k.startswith("train.batch=") for k in keys)
    assert base_keys("schema") == []


# ------------------------------------------------------------------ model.query_selection=mask (Mask DINO)
def test_mask_anchor_boxes_are_the_masks_extents_or_the_fallback():
    from dfineseg.model.decoder import mask_anchor_boxes

    logits = torch.full((1, 3, 8, 10), -5.0)
    logits[0, 0, 2:6, 1:4] = 5.0  # rows 2..5, cols 1..3
    logits[0, 1, 0:8, 9:10] = 5.0
    fallback = torch.full((1, 3, 4), 0.3)
    boxes = mask_anchor_boxes(logits, fallback).sigmoid()
    torch.testing.assert_close(boxes[0, 0], torch.tensor([2.5 / 10, 4 / 8, 3 / 10, 4 / 8]), atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[0, 1], torch.tensor([9.5 / 10, 0.5, 0.1, 1.0 - 1e-4]), atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[0, 2], torch.full((4,), 0.3).sigmoid())  # empty mask: its own box


def test_mask_anchor_boxes_ignore_mask_pixels_far_from_the_tokens_own_box():
    from dfineseg.model.decoder import inverse_sigmoid, mask_anchor_boxes

    logits = torch.full((1, 2, 20, 20), -5.0)
    logits[0, :, 8:12, 8:12] = 5.0  # the object, inside both tokens' boxes
    logits[0, :, 0, 19] = 5.0  # one stray pixel in a corner
    own = torch.tensor([[[0.5, 0.5, 0.3, 0.3], [0.5, 0.5, 1.0 - 1e-4, 1.0 - 1e-4]]])
    boxes = mask_anchor_boxes(logits, inverse_sigmoid(own)).sigmoid()
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.5, 0.5, 0.2, 0.2]), atol=1e-4, rtol=0)
    assert boxes[0, 1, 2] > 0.5  # a token whose own box spans the image sees the stray pixel too


def test_mask_query_selection_starts_the_decoder_from_mask_boxes_and_supervises_encoder_masks():
    from dfineseg.benchmarks.train_step import _targets
    from dfineseg.config import LossConfig
    from dfineseg.loss.criterion import build_criterion

    torch.manual_seed(0)
    model = DFINESeg("tiny", 3, "segment", num_queries=10, num_denoising=0, query_selection="mask")
    images = torch.rand(2, 3, 64, 64)
    seen = {}
    original = model.decoder._run_layers

    def spy(target, ref_unact, *args, **kwargs):
        seen["ref"] = ref_unact
        return original(target, ref_unact, *args, **kwargs)

    model.decoder._run_layers = spy
    out = model(images, _targets(2, 64, 64, 3))
    enc = out["enc_aux_outputs"][0]
    pan, mask_in = model.features(images)
    pixels = model.mask_head.pixel_features(mask_in)
    from dfineseg.model.decoder import mask_anchor_boxes

    expected = mask_anchor_boxes(model.mask_head.mask_logits(out_enc_memory(model, images), pixels),
                                 torch.logit(enc["pred_boxes"].clamp(1e-6, 1 - 1e-6)))
    torch.testing.assert_close(seen["ref"], expected, atol=1e-4, rtol=1e-4)
    losses = build_criterion(LossConfig(), 3, "segment")(out, _targets(2, 64, 64, 3))
    assert any("enc" in k and "mask" in k for k in losses), sorted(losses)
    plain = DFINESeg("tiny", 3, "segment", num_queries=10, num_denoising=0)
    plain_losses = build_criterion(LossConfig(), 3, "segment")(plain(images, _targets(2, 64, 64, 3)),
                                                                 _targets(2, 64, 64, 3))
    assert not any("enc" in k and "mask" in k for k in plain_losses)


def out_enc_memory(model, images):
    """The selected encoder states of a training forward (the decoder's extras), recomputed."""
    pan, mask_in = model.features(images)
    _, extras, _ = model.decode(pan, mask_in)
    return extras["enc_memory"]


def test_mask_query_selection_trains_and_exports_with_parity(small_data, tmp_path):
    _train_and_export(small_data, tmp_path, {"query_selection": "mask"})


# ------------------------------------------------------------------ model.decoder_balance=di (DI-MaskDINO)
def test_de_imbalance_interacts_then_keeps_the_best_scoring_tokens():
    from dfineseg.model.balance import DeImbalance

    torch.manual_seed(0)
    di = DeImbalance(16, 2, 32, layers=2).eval()
    head = torch.nn.Linear(16, 3)
    tokens, ref = torch.rand(2, 12, 16), torch.randn(2, 12, 4)
    with torch.no_grad():
        kept, kept_ref, aux = di(tokens, ref, head, keep=5)
    assert kept.shape == (2, 5, 16) and kept_ref.shape == (2, 5, 4) and len(aux) == 2
    torch.testing.assert_close(aux[0]["pred_boxes"], ref.sigmoid())  # zero-initialised deltas: boxes kept at start
    scores = aux[-1]["pred_logits"].max(-1).values
    best = scores.topk(5, dim=1).indices
    for b in range(2):  # the second selection: the interacted tokens with the best scores, with their boxes
        torch.testing.assert_close(kept_ref[b], ref[b, best[b]])
    assert not torch.allclose(kept, tokens.gather(1, best[..., None].expand(-1, -1, 16)))  # tokens interacted


def test_di_model_selects_twice_the_queries_first_and_supervises_each_interaction_layer():
    from dfineseg.benchmarks.train_step import _targets
    from dfineseg.config import LossConfig
    from dfineseg.loss.criterion import build_criterion

    torch.manual_seed(0)
    model = DFINESeg("tiny", 3, "segment", num_queries=10, num_denoising=0, decoder_balance="di")
    targets = _targets(2, 64, 64, 3)
    out = model(torch.rand(2, 3, 64, 64), targets)
    enc = out["enc_aux_outputs"]
    assert len(enc) == 3 and enc[0]["pred_logits"].shape[1] == 20 and out["pred_logits"].shape[1] == 10
    losses = build_criterion(LossConfig(), 3, "segment")(out, targets)
    assert any(k.endswith("_enc_2") for k in losses), sorted(losses)


def test_bato_starts_as_the_identity_then_moves_each_memory_token_towards_its_guiding_tokens():
    from dfineseg.model.balance import DeImbalance

    torch.manual_seed(0)
    di = DeImbalance(16, 2, 32, layers=1)
    memory, query, ref = torch.randn(2, 30, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 4)
    torch.testing.assert_close(di.optimize_memory(memory, query, ref), memory)  # zero gain: official model kept
    out = di.optimize_memory(memory, query, ref)
    out.sum().backward()
    assert di.tokens.gain.grad is not None and di.tokens.gain.grad.abs().sum() > 0  # the gain learns
    with torch.no_grad():
        di.tokens.gain.fill_(1.0)
        moved = di.optimize_memory(memory, query, ref)
        other = di.optimize_memory(memory, torch.randn(2, 5, 16), ref)
    assert not torch.allclose(moved, memory)
    assert not torch.allclose(moved, other)  # the refinement depends on the balance-aware query
    torch.testing.assert_close(moved[1], di.optimize_memory(memory[1:], query[1:], ref[1:])[0])  # per image


def test_di_model_trains_and_exports_with_parity(small_data, tmp_path):
    _train_and_export(small_data, tmp_path, {"decoder_balance": "di"})


def test_training_only_augmentations_leave_the_deploy_graph_unchanged(tmp_path):
    """mixup / cutmix / copy_paste act on the data only: the model a config builds, and the ONNX graph it
    exports, are the same with every one of them on."""
    import onnx

    from dfineseg.benchmarks.model_latency import export_onnx
    from dfineseg.config import Config
    from dfineseg.model.dfine import build_model
    from dfineseg.model.runner import deploy_module

    def graph(cfg: Config, name: str):
        torch.manual_seed(0)
        cfg.model.size = "tiny"
        model = build_model(cfg.model, 3).eval()
        path = tmp_path / f"{name}.onnx"
        export_onnx(deploy_module(model, topk=10), torch.rand(1, 3, 64, 64), path, True)
        g = onnx.load(str(path)).graph
        return [n.op_type for n in g.node], {i.name: tuple(i.dims) for i in g.initializer}

    mixed = Config()
    for step in ("mixup", "cutmix", "copy_paste"):
        getattr(mixed.data.augment, step).p = 0.5
    assert graph(Config(), "plain") == graph(mixed, "mixed")
