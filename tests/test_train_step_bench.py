"""The step-time benchmark's phase breakdown: every phase measured, and they add up to the step."""

from __future__ import annotations

import pytest


def test_breakdown_phases_cover_the_step(one_thread):
    from dfineseg.benchmarks.train_step import measure

    row = measure("tiny", 64, 2, steps=2, warmup=1, device="cpu", amp=False, threads=1, num_classes=3)
    phases = row["phases_s"]
    assert set(phases) == {"forward", "loss", "matcher", "backward", "optimizer", "ema"}
    assert all(v > 0 for v in phases.values())
    assert phases["matcher"] < phases["loss"]  # the matcher runs inside the criterion
    whole = sum(v for k, v in phases.items() if k != "matcher")
    assert whole == pytest.approx(row["step_s_median"], rel=0.5)


def test_model_settings_reach_the_measured_model(one_thread):
    from dfineseg.benchmarks.train_step import measure

    plain = measure("tiny", 64, 1, steps=1, warmup=0, device="cpu", amp=False, threads=1, num_classes=3,
                    model_keys=["memory_fusion=none"])
    fused = measure("tiny", 64, 1, steps=1, warmup=0, device="cpu", amp=False, threads=1, num_classes=3)
    assert plain["model"] == ["memory_fusion=none"] and fused["params_m"] > plain["params_m"]  # dense: the default
    with pytest.raises(Exception, match="memory_fusion"):  # the schema validates each setting
        measure("tiny", 64, 1, steps=1, warmup=0, device="cpu", amp=False, threads=1, num_classes=3,
                model_keys=["memory_fusion=sparse"])
