"""The short-budget recipe (dfineseg/train/short_budget.py): chosen only for keys the user did not set."""

from __future__ import annotations

from pathlib import Path

import yaml

from dfineseg.config import load_config
from dfineseg.train.short_budget import RECIPE, SHORT_BUDGET_MINUTES, apply_short_budget, describe, is_set

ROOT = Path(__file__).resolve().parents[1]


def _value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_a_time_budget_with_no_other_key_takes_the_whole_recipe_and_leaves_the_callers_config_alone():
    cfg = load_config(None, ["imgsz=320", "model.size=n", "time=10"])
    before = cfg.model_dump()
    chosen_cfg, chosen = apply_short_budget(cfg)
    assert [c.key for c in chosen] == [c.key for c in RECIPE]
    for choice in RECIPE:
        assert _value(chosen_cfg, choice.key) == choice.value, choice.key
    assert cfg.model_dump() == before  # the caller's object is untouched (and so are the schema's defaults)
    assert load_config(None, ["time=10"]).data.augment.mosaic.p == before["data"]["augment"]["mosaic"]["p"]
    text = describe(chosen, 10)
    assert "train.time=10 min" in text and "train.warmup_iters=20" in text and "model.num_queries=100" in text


def test_keys_given_on_the_command_line_or_in_a_file_are_kept(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_queries": 300}, "data": {"augment": {"mosaic": {"p": 0.5}}}}))
    cfg = load_config(path, ["time=10", "train.lr=1e-3", "loss.vfl=1"])
    assert is_set(cfg, "model.num_queries") and is_set(cfg, "data.augment.mosaic.p")
    assert not is_set(cfg, "data.augment.affine.p") and not is_set(cfg, "train.warmup_iters")
    chosen_cfg, chosen = apply_short_budget(cfg)
    keys = {c.key for c in chosen}
    assert not keys & {"model.num_queries", "data.augment.mosaic.p", "train.lr", "loss.vfl"}
    assert chosen_cfg.model.num_queries == 300 and chosen_cfg.data.augment.mosaic.p == 0.5
    assert chosen_cfg.train.lr == 1e-3 and chosen_cfg.loss.vfl == 1.0
    assert chosen_cfg.train.warmup_iters == 20 and chosen_cfg.data.augment.affine.p == 0.0


def test_fine_tuning_keeps_the_official_learning_rates(tmp_path):
    weights = tmp_path / "dfine_n_coco.pth"
    weights.write_bytes(b"")
    _, chosen = apply_short_budget(load_config(None, ["time=10", f"model.weights={weights}"]))
    keys = {c.key for c in chosen}
    assert "train.lr" not in keys and "train.backbone_lr" not in keys and "train.warmup_iters" in keys


def test_the_batch_is_chosen_on_a_cpu_only():
    cfg = load_config(None, ["time=10"])
    assert apply_short_budget(cfg, on_cpu=True)[0].train.batch == 4
    on_gpu, chosen = apply_short_budget(cfg, on_cpu=False)
    assert on_gpu.train.batch == cfg.train.batch and "train.batch" not in {c.key for c in chosen}


def test_no_recipe_without_a_short_budget_or_on_resume():
    assert apply_short_budget(load_config(None, ["epochs=3"]))[1] == []
    assert apply_short_budget(load_config(None, [f"time={SHORT_BUDGET_MINUTES * 2:g}"]))[1] == []
    assert apply_short_budget(load_config(None, ["time=10"]), resuming=True)[1] == []


def test_the_demo_recipe_is_its_own(small_data):
    """configs/demo.yaml sets every key the recipe would choose, so `make demo` trains as measured."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data={small_data}"])
    assert cfg.train.time
    assert apply_short_budget(cfg)[1] == []


def test_the_trainer_applies_the_recipe_and_writes_it_to_the_run_config(small_data, tmp_path, capsys):
    from dfineseg.train.trainer import Trainer

    cfg = load_config(None, [f"data={small_data}", "imgsz=64", "model.size=tiny", "time=10",
                             f"project={tmp_path}", "name=recipe", "workers=0"])
    trainer = Trainer(cfg)
    assert trainer.cfg.train.warmup_iters == 20 and trainer.cfg.model.num_queries == 100
    assert trainer.cfg.train.batch == 4  # these tests train on the CPU
    assert cfg.train.warmup_iters != 20  # the caller's config is not changed
    assert "short-budget recipe" in capsys.readouterr().err
