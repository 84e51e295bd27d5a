"""Loading official D-FINE files, HGNetv2 backbone files, and clear errors for wrong files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfineseg.model import DFINESeg, WeightsError, load_weights


def _fake_official(tmp_path: Path, num_classes: int, name: str = "dfine.pth", seed: int = 1) -> tuple[Path, dict]:
    """An official-layout file from our own detection state_dict, with distinct EMA and raw weights."""
    torch.manual_seed(seed)
    src = DFINESeg("tiny", num_classes, "detect")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ema = {k: v.clone() for k, v in src.state_dict().items()}
    raw = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in ema.items()}
    path = tmp_path / name
    torch.save({"model": raw, "ema": {"module": ema, "updates": 10}, "last_epoch": 3}, path)
    return path, ema


def test_official_file_with_other_class_count_reinitialises_only_class_tensors(tmp_path: Path) -> None:
    path, ema = _fake_official(tmp_path, num_classes=7)
    torch.manual_seed(5)
    model = DFINESeg("tiny", 3, "segment")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights(model, path)
    expected = {"decoder.enc_score_head.weight", "decoder.enc_score_head.bias", "decoder.denoising_class_embed.weight"}
    expected |= {f"decoder.dec_score_head.{i}.{t}" for i in range(2) for t in ("weight", "bias")}
    assert report.kind == "official" and report.source == "ema.module"
    assert set(report.reinitialised) == expected
    state = model.state_dict()
    for key, value in state.items():
        if key in expected or key.startswith("mask_head.") or key in ("decoder.anchors", "decoder.valid_mask"):
            assert torch.equal(value, fresh[key]), key  # kept its own value
        else:
            assert torch.equal(value, ema[key]), key  # EMA weights preferred over `model`


def test_same_class_count_loads_everything_and_rebuilds_size_buffers(tmp_path: Path) -> None:
    path, ema = _fake_official(tmp_path, num_classes=3)
    blob = torch.load(path, weights_only=True)
    blob["ema"]["module"]["decoder.anchors"] = torch.zeros_like(blob["ema"]["module"]["decoder.anchors"])
    torch.save(blob, path)
    model = DFINESeg("tiny", 3, "detect")
    anchors = model.decoder.anchors.clone()
    report = load_weights(model, path)
    assert report.reinitialised == []
    assert torch.equal(model.decoder.anchors, anchors)  # never taken from the file
    assert torch.equal(model.decoder.enc_score_head.weight, ema["decoder.enc_score_head.weight"])


def test_model_key_is_used_without_ema(tmp_path: Path) -> None:
    path, ema = _fake_official(tmp_path, num_classes=3)
    blob = torch.load(path, weights_only=True)
    torch.save({"model": blob["model"]}, path)
    model = DFINESeg("tiny", 3, "detect")
    assert load_weights(model, path).source == "model"
    assert torch.equal(model.decoder.pre_bbox_head.layers[0].bias, blob["model"]["decoder.pre_bbox_head.layers.0.bias"])


def test_backbone_file_without_prefix_loads_into_backbone_only(tmp_path: Path) -> None:
    torch.manual_seed(2)
    donor = DFINESeg("tiny", 3, "detect")
    with torch.no_grad():
        for p in donor.backbone.parameters():
            p.add_(1.0)
    state = donor.backbone.state_dict()
    path = tmp_path / "PPHGNetV2_T0_stage1.pth"
    torch.save(state, path)
    model = DFINESeg("tiny", 3, "detect")
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    report = load_weights(model, path)
    assert report.kind == "backbone" and report.loaded == len(state)
    assert torch.equal(model.backbone.stem.stem1.conv.weight, state["stem.stem1.conv.weight"])
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


def test_wrong_files_give_clear_errors(tmp_path: Path) -> None:
    model = DFINESeg("tiny", 3, "detect")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load_weights(model, text)

    path, _ = _fake_official(tmp_path, num_classes=3)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(model, truncated)

    # Another size: the backbone stem of the file is wider than ours.
    blob = torch.load(path, weights_only=True)
    blob["ema"]["module"]["backbone.stem.stem1.conv.weight"] = torch.zeros(16, 3, 3, 3)
    other = tmp_path / "other_size.pth"
    torch.save(blob, other)
    with pytest.raises(WeightsError) as err:
        load_weights(model, other)
    msg = str(err.value)
    assert "backbone.stem.stem1.conv.weight" in msg and "(8, 3, 3, 3)" in msg and "(16, 3, 3, 3)" in msg

    with pytest.raises(WeightsError, match="not found"):
        load_weights(model, tmp_path / "missing.pth")
    empty = tmp_path / "empty.pth"
    torch.save({"optimizer": {"lr": 1.0}}, empty)
    with pytest.raises(WeightsError, match="no model weights found"):
        load_weights(model, empty)


def test_official_dfine_file_into_a_dinov2_model_loads_encoder_and_decoder_and_lists_the_backbone(tmp_path: Path):
    path, ema = _fake_official(tmp_path, num_classes=3)
    torch.manual_seed(5)
    model = DFINESeg("tiny", 3, "segment", backbone="dinov2_t")
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    report = load_weights(model, path)
    assert report.skipped and all(k.startswith("backbone.") for k in report.skipped)
    assert len(report.skipped) == sum(1 for k in ema if k.startswith("backbone."))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh.items())  # the ViT keeps its own weights
    for key in ("encoder.input_proj.0.conv.weight", "decoder.dec_score_head.0.weight"):
        assert torch.equal(state[key], ema[key])


def test_official_file_into_a_model_with_dense_memory_fusion_starts_it_as_a_pass_through(tmp_path: Path):
    """The official file has no fusion: the dense model must compute what the official weights compute (eval
    mode), not feed the pretrained decoder a random projection of its features."""
    path, ema = _fake_official(tmp_path, num_classes=3)
    torch.manual_seed(3)
    model = DFINESeg("tiny", 3, "detect", memory_fusion="dense")
    plain = DFINESeg("tiny", 3, "detect")
    load_weights(model, path)
    load_weights(plain, path)
    state = model.state_dict()
    assert torch.equal(state["encoder.pan_blocks.0.cv1.conv.weight"], ema["encoder.pan_blocks.0.cv1.conv.weight"])
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("encoder.fusion."))
    model.eval(), plain.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fused, official = model(x), plain(x)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(fused[key], official[key], rtol=1e-5, atol=1e-5)
    # Trained on from there, the fusion reads all three feature sets: its weights are ordinary parameters.
    assert all(p.requires_grad for p in model.encoder.fusion.parameters())


def test_checkpoint_without_a_switch_loads_into_a_model_with_it_and_the_reverse_names_the_switch(tmp_path: Path):
    torch.manual_seed(0)
    plain = DFINESeg("tiny", 3, "segment")
    path = tmp_path / "plain.pt"
    torch.save({"schema_version": 1, "config": {}, "names": ["a", "b", "c"], "model": plain.state_dict()}, path)
    fused = DFINESeg("tiny", 3, "segment", memory_fusion="dense")
    report = load_weights(fused, path)
    assert report.kind == "dfineseg"
    fused.eval(), plain.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)["pred_masks"], plain(x)["pred_masks"], rtol=1e-5, atol=1e-5)
    dense_path = tmp_path / "dense.pt"
    torch.save({"schema_version": 1, "config": {}, "names": ["a", "b", "c"], "model": fused.state_dict()}, dense_path)
    with pytest.raises(WeightsError, match=r"model\.memory_fusion=dense"):
        load_weights(DFINESeg("tiny", 3, "segment"), dense_path)


def test_backbone_only_file_leaves_the_fusion_at_its_own_initialisation(tmp_path: Path):
    torch.manual_seed(0)
    model = DFINESeg("tiny", 3, "segment", memory_fusion="dense")
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.fusion.")}
    path = tmp_path / "backbone.pth"
    torch.save({k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}, path)
    assert load_weights(model, path).kind == "backbone"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh.items())  # as trained from scratch (what was measured)


def test_checkpoint_with_another_mask_head_width_names_the_width_settings(tmp_path: Path):
    # N's default mask head went from 64 to 32 channels (config schema 4): starting a new run from an older N
    # checkpoint must say which settings load it, not blame the model size.
    wide = DFINESeg("tiny", 3, "segment", fpn_channels=64, mask_channels=64)
    path = tmp_path / "wide.pt"
    torch.save({"schema_version": 3, "config": {}, "names": ["a", "b", "c"], "model": wide.state_dict()}, path)
    with pytest.raises(WeightsError, match=r"mask head has another width.*model\.mask_head\.fpn_channels"):
        load_weights(DFINESeg("tiny", 3, "segment", fpn_channels=32, mask_channels=32), path)
    assert load_weights(DFINESeg("tiny", 3, "segment", fpn_channels=64, mask_channels=64), path).kind == "dfineseg"
