"""The one config: validation messages, overrides, base files, saving with a schema version."""

from __future__ import annotations

import pytest
import yaml

from dfineseg.config import (
    EXPORT_ALIASES,
    SCHEMA_VERSION,
    Config,
    load_config,
)
from dfineseg.overrides import ConfigError, parse_overrides


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg.schema_version == SCHEMA_VERSION
    out = tmp_path / "config.yaml"
    cfg.save(out)
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()


def test_every_section_is_declared():
    assert set(Config.model_fields) >= {"data", "model", "train", "eval", "export", "infer", "bench", "loss"}


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.epohcs=3"])
    assert "unknown key 'train.epohcs'" in str(err.value)
    assert "did you mean 'epochs'" in str(err.value)


def test_unknown_section_suggests_the_close_one(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("modle:\n  size: s\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value)
    assert "did you mean 'model'" in str(err.value)


def test_wrong_type_names_the_key_path_and_type():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.batch=many"])
    assert "train.batch" in str(err.value)
    assert "integer" in str(err.value)


def test_bad_literal_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.size=q"])
    assert "model.size" in str(err.value) and "'n'" in str(err.value)


def test_missing_dataset_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "data.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"data={missing}"])
    assert str(missing) in str(err.value)


def test_imgsz_must_be_multiple_of_32():
    assert load_config(overrides=["imgsz=[480,640]"]).data.imgsz == (480, 640)
    assert load_config(overrides=["imgsz=320"]).data.imgsz == (320, 320)
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(overrides=["imgsz=300"])


def test_dotted_overrides_and_aliases_types():
    cfg = load_config(overrides=["epochs=3", "model.mask_head.mask_channels=32", "train.amp=false", "lr=1e-4"])
    assert cfg.train.epochs == 3 and cfg.model.mask_head.mask_channels == 32
    assert cfg.train.amp is False and cfg.train.lr == pytest.approx(1e-4)
    exp = load_config(overrides=["format=onnx,openvino", "half=true", "topk=50"], aliases=EXPORT_ALIASES)
    assert exp.export.formats == ["onnx", "openvino"] and exp.export.half and exp.export.topk == 50


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_base_chain_merges_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 10\n  batch: 4\n")
    (tmp_path / "size.yaml").write_text("model:\n  size: s\ntrain:\n  batch: 2\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("base: [base.yaml, size.yaml]\ntrain:\n  epochs: 20\n")
    cfg = load_config(exp, overrides=["train.seed=7"])
    assert (cfg.model.size, cfg.train.batch, cfg.train.epochs, cfg.train.seed) == ("s", 2, 20, 7)


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batch: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "line" in str(err.value)


def test_newer_schema_is_refused():
    with pytest.raises(ConfigError, match="newer"):
        load_config(overrides=[f"schema_version={SCHEMA_VERSION + 1}"])


def test_repository_configs_validate(tmp_path):
    from conftest import REPO_ROOT

    for path in sorted((REPO_ROOT / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        data_path = (raw or {}).get("data", {}).get("path")
        overrides = [f"data.path={tmp_path}"] if data_path else []  # demo data may not exist yet
        load_config(path, overrides=overrides)


@pytest.mark.parametrize("bad", ["banana", "gpu0", "cuda:x", "cuda:-1"])
def test_train_device_is_validated_naming_the_key(bad):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"device={bad}"])
    assert "train.device" in str(err.value) and "cuda:N" in str(err.value)


def test_train_device_forms_the_trainer_takes():
    assert load_config(overrides=["device=0"]).train.device == "cuda:0"
    assert load_config(overrides=["device=cuda:1"]).train.device == "cuda:1"
    assert load_config(overrides=["device=CPU"]).train.device == "cpu"
    assert load_config().train.device == "auto"
    with pytest.raises(ConfigError, match="gpus=N"):
        load_config(overrides=["device=0,1"])


def test_cli_bad_device_is_one_message_not_a_traceback(capsys):
    from dfineseg import cli

    assert cli.main(["train", "device=banana"]) == 2
    err = capsys.readouterr().err
    assert "train.device" in err and "Traceback" not in err


def test_imgsz_must_be_whole_pixels():
    for text in ("imgsz=128.9", "imgsz=[128.5,64]"):
        with pytest.raises(ConfigError, match=r"data\.imgsz.*whole numbers"):
            load_config(overrides=[text])
    assert load_config(overrides=["imgsz=128.0"]).data.imgsz == (128, 128)
    with pytest.raises(ConfigError, match=r"export\.imgsz"):
        load_config(overrides=["imgsz=96.5"], aliases=EXPORT_ALIASES)


def test_short_forms_and_setting_names_are_suggested():
    from dfineseg.api import _resolve
    from dfineseg.config import TRAIN_ALIASES

    cases = {"epoch=3": "did you mean 'epochs'", "batchsize=4": "did you mean 'batch'",
             "warmup_iters=5": "did you mean 'train.warmup_iters'", "modle.size=s": "did you mean 'model'"}
    for text, hint in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[text])
        assert hint in str(err.value), (text, str(err.value))
    with pytest.raises(ConfigError, match="did you mean 'format'"):
        load_config(overrides=["formt=onnx"], aliases=EXPORT_ALIASES)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        _resolve(None, {"epoch": 3}, TRAIN_ALIASES)  # dfineseg.api.train(epoch=3)


def test_short_form_in_a_yaml_file_names_the_full_key(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(exp)


# ------------------------------------------------------------------ the infer section: one schema (infer_cli.OPTIONS)
def test_infer_section_is_checked_alike_by_train_config_and_infer_command(tmp_path):
    from dfineseg.infer_cli import resolve_options

    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 3\ninfer:\n  conf: 0.3\n  backend: onnxruntime\n  weights: m.onnx\n")
    cfg = load_config(good)  # keys only `dfineseg infer` has (backend, the short form weights) are accepted
    assert cfg.infer == {"conf": 0.3, "backend": "onnxruntime", "weights": "m.onnx"}
    opts = resolve_options(["source=imgs"], config=good)
    assert opts["conf"] == 0.3 and opts["backend"] == "onnxruntime" and opts["model"] == "m.onnx"
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)  # kept as written: a run's config.yaml feeds `dfineseg infer config=...` the same options
    assert resolve_options(["source=imgs"], config=saved) == opts

    for text, message in [("infer:\n  cnof: 0.3\n", "unknown infer option 'cnof'; did you mean 'conf'?"),
                          ("infer:\n  conf: 1.5\n", "infer option conf=1.5: expected a number in 0..1")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError) as train_err:
            load_config(bad)
        with pytest.raises(ConfigError) as infer_err:
            resolve_options(["model=m.onnx", "source=imgs"], config=bad)
        assert message in str(train_err.value) and message in str(infer_err.value)
        assert str(bad) in str(train_err.value) and "infer" in str(train_err.value)
    with pytest.raises(ConfigError, match="did you mean 'conf'"):
        load_config(overrides=["infer.cnof=0.3"])


def test_infer_section_of_older_saved_configs_still_loads():
    # What the removed pydantic InferConfig wrote into every run's config.yaml and checkpoint.
    old = {"model": None, "source": None, "out": "runs/infer", "conf": None, "device": "cpu", "half": False,
           "precision": None, "threads": None, "save_images": True, "save_json": True, "save_txt": False,
           "save_crops": False, "mask_alpha": 0.45}
    assert load_config(overrides={"infer": old}).infer == old
    assert Config.model_validate({"infer": None}).infer == {}


def test_top_level_infer_option_names_are_suggested():
    with pytest.raises(ConfigError, match="did you mean 'infer.save_json'"):
        load_config(overrides=["save_json=false"])
    with pytest.raises(ConfigError, match="did you mean 'infer'"):
        load_config(overrides=["infr.conf=0.3"])


def test_configs_written_before_a_default_changed_keep_the_defaults_they_trained_with(tmp_path):
    """Schema 2 turned on model.memory_fusion=dense and copy-paste: a run folder's config.yaml or a checkpoint's
    config written as version 1 without those keys must rebuild the version-1 model and recipe."""
    today = load_config()
    assert today.model.memory_fusion is None and today.data.augment.copy_paste.p == 0.5  # None: by size
    v1 = Config().to_dict()
    v1["schema_version"] = 1
    del v1["model"]["memory_fusion"]
    del v1["data"]["augment"]["copy_paste"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(v1))
    old = load_config(path)
    assert old.model.memory_fusion == "none" and old.data.augment.copy_paste.p == 0.0
    assert old.schema_version == SCHEMA_VERSION  # saved again, it says what it means under today's defaults
    old.save(tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml").model.memory_fusion == "none"
    # Keys a version-1 file does hold are kept, and an off_epoch alone keeps version 1's p.
    v1["model"]["memory_fusion"] = "dense"
    v1["data"]["augment"]["copy_paste"] = {"off_epoch": 3}
    path.write_text(yaml.safe_dump(v1))
    kept = load_config(path)
    assert kept.model.memory_fusion == "dense"
    assert kept.data.augment.copy_paste.p == 0.0 and kept.data.augment.copy_paste.off_epoch == 3
    # A user's file has no schema_version: today's defaults; the command line too.
    path.write_text(yaml.safe_dump({"model": {"size": "s"}}))
    assert load_config(path).model.memory_fusion is None
    assert load_config(path, ["model.memory_fusion=dense"]).model.memory_fusion == "dense"
    # Schema 3 made the fusion's default depend on the size: a version-2 file without the key meant dense.
    v2 = Config().to_dict()
    v2["schema_version"] = 2
    v2["model"].update(size="s")
    del v2["model"]["memory_fusion"]
    path.write_text(yaml.safe_dump(v2))
    assert load_config(path).model.memory_fusion == "dense"
    # Schema 4 made the mask head's widths depend on the size: a version-3 N file without them meant 64.
    v3 = Config().to_dict()
    v3["schema_version"] = 3
    del v3["model"]["mask_head"]["fpn_channels"], v3["model"]["mask_head"]["mask_channels"]
    path.write_text(yaml.safe_dump(v3))
    old_head = load_config(path).model.mask_head
    assert v3["model"]["size"] == "n" and (old_head.fpn_channels, old_head.mask_channels) == (64, 64)


def test_dense_memory_fusion_defaults_by_size_and_a_run_saves_the_choice():
    from dfineseg.model.dfine import memory_fusion

    cfg = load_config()
    assert [memory_fusion(load_config(overrides=[f"model.size={size}"]).model) for size in "nsmlx"] == [
        "dense", "none", "none", "none", "none"]
    assert memory_fusion(load_config(overrides=["model.size=s", "model.memory_fusion=dense"]).model) == "dense"
    assert memory_fusion(load_config(overrides=["model.memory_fusion=none"]).model) == "none"
    assert cfg.model.size == "n" and memory_fusion(cfg.model) == "dense"


def test_mask_head_widths_default_by_size():
    from dfineseg.model.dfine import build_model, mask_head_widths

    assert [mask_head_widths(load_config(overrides=[f"model.size={size}"]).model) for size in ("tiny", *"nsmlx")] == [
        (64, 64), (32, 32), (64, 64), (64, 64), (64, 64), (64, 64)]
    assert mask_head_widths(load_config(overrides=["model.mask_head.fpn_channels=64"]).model) == (64, 32)
    head = build_model(load_config().model, 3).mask_head  # N by default
    assert head.fuse.conv.out_channels == 32 and head.mask_channels == 32


def test_checkpoint_of_a_version_1_run_rebuilds_its_model(tmp_path):
    import torch

    from dfineseg.model import DFINESeg
    from dfineseg.model.checkpoint import config_from_checkpoint
    from dfineseg.model.dfine import build_model

    plain = DFINESeg("tiny", 2, "segment")
    raw = Config().to_dict()
    raw["schema_version"] = 1
    raw["model"].update(size="tiny", num_classes=2)
    del raw["model"]["memory_fusion"]
    cfg = config_from_checkpoint({"config": raw, "model": plain.state_dict()})
    model = build_model(cfg.model, 2)
    model.load_state_dict(plain.state_dict(), strict=True)  # the same keys: no fusion
    assert not any(k.startswith("encoder.fusion.") for k in model.state_dict())
    assert torch.equal(model.state_dict()["encoder.input_proj.0.conv.weight"],
                       plain.state_dict()["encoder.input_proj.0.conv.weight"])
