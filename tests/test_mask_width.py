"""The mask-width study's scoring and choice rule (benchmarks/mask_width.py); the trainings it launches
are plain `dfineseg train` runs covered by test_train.py."""

from __future__ import annotations

import pytest

from dfineseg.benchmarks.mask_width import choose_width, run_score, summarise


def _scores(table: dict[int, list[float]]) -> dict[tuple[int, int], dict[str, float]]:
    return {(w, s): {"best_f1": f1, "mask_map50_95": f1 / 2} for w, f1s in table.items() for s, f1 in enumerate(f1s)}


def test_narrowest_within_one_sd_of_the_widest_is_chosen():
    # 256: mean 0.50, sd 0.02 -> anything with mean >= 0.48 qualifies.
    summary = summarise(_scores({64: [0.40, 0.42, 0.44], 128: [0.47, 0.49, 0.49], 256: [0.48, 0.50, 0.52]}))
    assert summary[256]["mean"] == pytest.approx(0.50)
    assert summary[256]["sd"] == pytest.approx(0.02)
    assert choose_width(summary) == 128
    summary = summarise(_scores({64: [0.49, 0.50, 0.47], 128: [0.40, 0.41, 0.42], 256: [0.48, 0.50, 0.52]}))
    assert choose_width(summary) == 64
    summary = summarise(_scores({64: [0.30, 0.31, 0.32], 128: [0.40, 0.41, 0.42], 256: [0.48, 0.50, 0.52]}))
    assert choose_width(summary) == 256


def test_run_score_takes_the_best_validated_epoch(tmp_path):
    (tmp_path / "results.csv").write_text(
        "epoch,step,time_s,val/best_f1,val/best_conf,val/mask_map50_95,val/box_f1\n"
        "1,75,60,0.20,0.3,0.10,0.21\n"
        "2,150,120,,,,\n"
        "3,225,180,0.45,0.5,0.30,0.44\n"
        "4,300,240,0.40,0.5,0.31,0.41\n", encoding="utf-8")
    score = run_score(tmp_path)
    assert score["best_f1"] == pytest.approx(0.45)
    assert score["epoch"] == 3 and score["steps"] == 300 and score["mask_map50_95"] == pytest.approx(0.30)
    (tmp_path / "results.csv").write_text("epoch,step,time_s,val/best_f1\n1,75,60,\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="no validated epoch"):
        run_score(tmp_path)
