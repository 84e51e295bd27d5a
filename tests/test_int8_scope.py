"""The INT8 float-kept set (export/int8.py PRECISION_SENSITIVE) is matched by patterns over OpenVINO
operation names; a rename in the model or the exporter would make a pattern match nothing, silently
quantising what must stay float. Each pattern must match operations of exported N and S models, exported
the way `dfineseg export format=openvino` does it."""

from __future__ import annotations

import re

import pytest

trained_fixture = pytest.importorskip("trained_fixture")
from trained_fixture import trained_run  # noqa: E402,F401  (session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.parametrize("size", ["n", "s"])
def test_every_float_kept_pattern_matches_operations_of_an_exported_model(trained_run, tmp_path, size):  # noqa: F811
    import openvino as ov

    from dfineseg.export.api import export_model
    from dfineseg.export.int8 import PRECISION_SENSITIVE, unmatched_patterns
    from dfineseg.model.checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
    from dfineseg.model.dfine import build_model

    ckpt = load_checkpoint(trained_run.checkpoint)
    cfg = config_from_checkpoint(ckpt)
    cfg.model.size = size
    model = build_model(cfg.model, len(ckpt["names"]))  # random weights: names do not depend on them
    path = tmp_path / f"{size}.pt"
    save_checkpoint({**ckpt, "model": model.state_dict(), "ema": None, "optimizer": None,
                     "config": cfg.to_dict()}, path)
    cfg.export.formats = ["openvino"]
    cfg.export.parity = False
    cfg.export.imgsz = (128, 128)
    cfg.export.out = str(tmp_path / "export")
    paths = export_model(path, cfg, say=None)
    xml = paths["openvino"] if str(paths["openvino"]).endswith(".xml") else paths["openvino"] / "model.xml"
    ops = [op.get_friendly_name() for op in ov.Core().read_model(str(xml)).get_ops()]
    for pattern in PRECISION_SENSITIVE:  # every size's model has every part, so all patterns must match
        assert any(re.match(pattern, name) for name in ops), f"{pattern} matches no operation of an exported {size}"
    assert unmatched_patterns(ops) == []
    assert unmatched_patterns(["images", "Add_1"]) == list(PRECISION_SENSITIVE)


def test_small_models_quantise_their_box_heads_and_larger_ones_keep_them_in_float():
    from dfineseg.export.int8 import FLOAT_FROM_S_UP, PRECISION_SENSITIVE, float_kept_patterns

    assert set(FLOAT_FROM_S_UP) <= set(PRECISION_SENSITIVE)
    for size in ("s", "m", "l", "x", None):
        assert float_kept_patterns(size) == PRECISION_SENSITIVE
    for size in ("tiny", "n"):
        kept = float_kept_patterns(size)
        assert not set(FLOAT_FROM_S_UP) & set(kept) and set(kept) | set(FLOAT_FROM_S_UP) == set(PRECISION_SENSITIVE)
