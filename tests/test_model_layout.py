"""The detection part's state_dict equals the official D-FINE layout; parameter counts equal official."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfineseg.model import DFINESeg, count_parameters

DATA = Path(__file__).parent / "data"
OFFICIAL_PARAMS = {"n": 3_782_693, "s": 10_321_877, "m": 19_590_064, "l": 31_244_152, "x": 62_621_560}


@pytest.fixture(scope="module")
def detection_models() -> dict[str, DFINESeg]:
    torch.manual_seed(0)
    return {size: DFINESeg(size, 80, "detect", num_denoising=100) for size in OFFICIAL_PARAMS}


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(detection_models: dict[str, DFINESeg], size: str) -> None:
    assert count_parameters(detection_models[size]) == OFFICIAL_PARAMS[size]


def _official_keys(size: str) -> list[tuple[str, str]]:
    path = DATA / f"dfine_keys_{size}.txt"
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = (line.split("\t") + [""])[:2]
        rows.append((key, shape))
    return rows


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_state_dict_keys_and_shapes_equal_official(detection_models: dict[str, DFINESeg], size: str) -> None:
    ours = [(k, ",".join(map(str, v.shape))) for k, v in detection_models[size].state_dict().items()]
    official = _official_keys(size)
    only_ours = [k for k in ours if k not in set(official)]
    only_official = [k for k in official if k not in set(ours)]
    assert (only_ours, only_official) == ([], [])
    assert ours == official  # same order too


def test_shared_and_size_dependent_entries(detection_models: dict[str, DFINESeg]) -> None:
    model = detection_models["s"]
    sd = model.state_dict()
    # Official quirk: up/reg_scale are one parameter each, reachable under two names.
    assert model.decoder.up is model.decoder.decoder.up
    assert "decoder.decoder.up" in sd and "decoder.up" in sd
    assert sd["decoder.anchors"].shape == (1, 8400, 4) and sd["decoder.valid_mask"].shape == (1, 8400, 1)
    assert not any(k.startswith("decoder.input_proj") for k in sd)  # only X needs decoder projections
    assert any(k.startswith("decoder.input_proj") for k in detection_models["x"].state_dict())


def test_segment_model_adds_only_mask_head_keys() -> None:
    det = DFINESeg("n", 80, "detect").state_dict()
    seg = DFINESeg("n", 80, "segment").state_dict()
    extra = set(seg) - set(det)
    assert extra and all(k.startswith("mask_head.") for k in extra)
    assert set(det) <= set(seg)
