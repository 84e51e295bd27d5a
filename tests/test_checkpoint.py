"""Checkpoint files: weights_only loading, rebuilding the model from the file alone, clear errors."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from dfineseg.config import Config
from dfineseg.model import checkpoint as ck
from dfineseg.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dfineseg.model.dfine import build_model
from dfineseg.model.model_file import load_model_file
from dfineseg.train.rng_state import capture_rng, restore_rng


def _tiny_cfg(tmp_path) -> Config:
    cfg = Config()
    cfg.model.size = "tiny"
    cfg.model.num_queries = 20
    cfg.model.num_denoising = 0
    cfg.data.imgsz = (64, 96)
    return cfg


def _ckpt(cfg: Config, model: torch.nn.Module, ema_state=None) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {
        "config": cfg.to_dict(), "names": ["a", "b"], "category_ids": [3, 7], "model": model.state_dict(),
        "ema": ema_state, "ema_updates": 5, "optimizer": opt.state_dict(), "scheduler": {"step_count": 3},
        "scaler": {}, "epoch": 1, "step": 3, "rng": capture_rng(), "metrics": {"mask_f1": 0.5},
        "best_fitness": 0.5,
    }


def test_roundtrip_weights_only_and_model_rebuilt_from_file_alone(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, 2).eval()
    ema_model = build_model(cfg.model, 2).eval()  # different init: the loader must prefer it
    path = tmp_path / "last.pt"
    save_checkpoint(_ckpt(cfg, model, ema_model.state_dict()), path)

    raw = torch.load(path, weights_only=True)  # no pickled classes anywhere in the file
    assert raw["schema_version"] == ck.CHECKPOINT_SCHEMA and raw["names"] == ["a", "b"]
    assert isinstance(raw["rng"]["torch"], torch.Tensor)

    opened = load_model_file(path)
    loaded = opened.model
    assert opened.ema is True and opened.names == ["a", "b"] and opened.category_ids == [3, 7]
    assert opened.task == "segment" and opened.deploy_info().imgsz == (64, 96)
    assert (opened.epoch, opened.step, opened.metrics) == (1, 3, {"mask_f1": 0.5})
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ref = ema_model(x)["pred_logits"]
        got = loaded(x)["pred_logits"]
    assert torch.equal(ref, got)
    raw = load_model_file(path, prefer_ema=False)
    with torch.no_grad():
        assert torch.equal(raw.model(x)["pred_logits"], model(x)["pred_logits"])
    assert raw.ema is False


def test_missing_truncated_and_foreign_files_give_clear_errors(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    model = build_model(cfg.model, 2)
    good = tmp_path / "good.pt"
    save_checkpoint(_ckpt(cfg, model), good)

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")

    truncated = tmp_path / "truncated.pt"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)

    for i, content in enumerate((b"not a checkpoint at all", b"hello", b"\x80\x02}q\x00.")):
        garbage = tmp_path / f"garbage{i}.pt"
        garbage.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"garbage{i}.pt"):
            load_checkpoint(garbage)

    plain_state = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), plain_state)
    with pytest.raises(CheckpointError, match="not a dfineseg checkpoint"):
        load_checkpoint(plain_state)

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": model}, pickled)  # a whole nn.Module: refused by weights_only
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(pickled)


def test_newer_schema_refused_and_migrations_applied(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    model = build_model(cfg.model, 2)
    ckpt = _ckpt(cfg, model)

    newer = tmp_path / "newer.pt"
    save_checkpoint({**ckpt, "schema_version": ck.CHECKPOINT_SCHEMA + 1}, newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)

    # An old layout (version 0 kept the class names under `classes`) is upgraded on load.
    old = {k: v for k, v in ckpt.items() if k != "names"}
    old["classes"] = ["a", "b"]
    old["schema_version"] = 0
    path = tmp_path / "old.pt"
    torch.save(old, path)

    def upgrade_0(c):
        c = dict(c)
        c["names"] = c.pop("classes")
        return c

    with pytest.raises(CheckpointError):
        load_checkpoint(path)  # `names` missing and no migration registered
    monkeypatch.setitem(ck.MIGRATIONS, 0, upgrade_0)
    monkeypatch.setattr(ck, "_REQUIRED", ("config", "model"))
    migrated = load_checkpoint(path)
    assert migrated["names"] == ["a", "b"] and migrated["schema_version"] == ck.CHECKPOINT_SCHEMA


def test_rng_capture_restore_roundtrip():
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_failed_save_keeps_the_previous_file(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    model = build_model(cfg.model, 2)
    path = tmp_path / "last.pt"
    save_checkpoint(_ckpt(cfg, model), path)
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise pickle.PicklingError("boom")

    with pytest.raises(Exception, match="boom"):
        save_checkpoint({**_ckpt(cfg, model), "bad": Unsaveable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
