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


def test_dense_fusion_model_trains_and_exports_with_parity(small_data, tmp_path):
    from dfineseg.config import build_config
    from dfineseg.export.api import export_model
    from dfineseg.model.checkpoint import config_from_checkpoint, load_checkpoint
    from dfineseg.train.trainer import Trainer

    cfg = build_config({
        "data": {"path": str(small_data), "imgsz": 64, "workers": 0,
                 "augment": {"mosaic": {"p": 0.0}, "affine": {"p": 0.0}}},
        "model": {"size": "tiny", "num_queries": 10, "num_denoising": 6, "memory_fusion": "dense"},
        "eval": {"plots": False, "batch": 2},
        "train": {"epochs": 1, "batch": 2, "project": str(tmp_path), "name": "fusion", "warmup_iters": 1,
                  "ema_warmup": 2, "seed": 0, "tensorboard": False, "plot_images": 0},
    })
    trainer = Trainer(cfg)
    best = trainer.fit()
    assert any(k.startswith("encoder.fusion.") for k in trainer.model.state_dict())
    assert isinstance(trainer.model, DFINESeg)
    ecfg = config_from_checkpoint(load_checkpoint(best))
    assert ecfg.model.memory_fusion == "dense"
    ecfg.data.path = str(small_data)
    ecfg.export.formats = ["onnx", "openvino"]
    ecfg.export.out = str(tmp_path / "export")
    ecfg.export.parity_images = 2
    paths = export_model(best, ecfg, say=None)
    summary = json.loads(paths["summary"].read_text())
    assert all(summary["artefacts"][k]["parity"]["passed"] for k in ("onnx", "openvino")), summary


def test_ablation_table_reports_mean_and_sd_per_variant():
    from dfineseg.benchmarks.seed_ablation import _variant, table

    assert _variant("fusion=model.memory_fusion=dense,data.augment.mixup.p=0.5") == (
        "fusion", ["model.memory_fusion=dense", "data.augment.mixup.p=0.5"])
    assert _variant("default=") == ("default", [])
    rows = [{"variant": "default", "mask_f1": f, "box_f1": f, "mask_map50_95": 0.1, "s_per_step": 1.0}
            for f in (0.2, 0.4)]
    text = table(rows)
    assert "| default | 2 | 0.300 ± 0.141 |" in text
