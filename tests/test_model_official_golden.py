"""Our eval-mode D-FINE-N equals the official implementation (Peterande/D-FINE @ 4a1f73a) on golden tensors.

`data/golden_dfine_n.pt` holds outputs of the official code, generated in a scratch environment outside this
repo (official COCO N config, 80 classes). An N state_dict is 15 MB, so instead of storing it both sides fill
every tensor with `golden_fill`: a deterministic, version-independent formula applied key for key, so the
file holds only the images, the official outputs and a checksum of the filled weights (under 1 MB).

Cases: 256x256, and 256x320 where the official sin-cos position embedding was called with its (w, h)
arguments swapped, i.e. the row-major ordering we implement (upstream orders it wrongly for H != W).
Queries come in top-k order of the encoder scores, and scores closer than float noise can swap places:
the test aligns our queries to the official ones through the selected encoder indices, as the official
comparison did.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dfineseg.config import ModelConfig
from dfineseg.model import build_model

GOLDEN = Path(__file__).parent / "data" / "golden_dfine_n.pt"
TOL = 1e-4

# Tensors whose values are fixed by the architecture or the input size, not learned: left as built.
_KEEP_SUFFIXES = ("num_batches_tracked", "anchors", "valid_mask", "num_points_scale", "up", "reg_scale")


def _uniform(n: int) -> torch.Tensor:
    """n values in [-1, 1) from a sine hash of the element index in float64; identical on every platform
    to far below the test tolerance (unlike torch's RNG streams, which may change between releases)."""
    h = torch.sin(torch.arange(n, dtype=torch.float64) * 12.9898 + 78.233) * 43758.5453
    return (h - torch.floor(h)) * 2.0 - 1.0


def _filled(key: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and key.rsplit(".", 1)[-1] not in _KEEP_SUFFIXES


def golden_fill(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deterministic stand-in weights of sensible scale for every learned tensor (LeCun-uniform matrices,
    norms near identity, BN statistics near (0, 1)), so every head, gate and the LQE take part. One hash
    stream is consumed by the keys in sorted order."""
    keys = sorted(state_dict)
    stream = _uniform(sum(state_dict[k].numel() for k in keys if _filled(k, state_dict[k])))
    out, at = {}, 0
    for key in keys:
        t = state_dict[key]
        if not _filled(key, t):
            out[key] = t.clone()
            continue
        u = stream[at:at + t.numel()].reshape(t.shape)
        at += t.numel()
        name = key.rsplit(".", 1)[-1]
        if name == "running_var":
            v = 1.0 + 0.25 * u
        elif name == "running_mean":
            v = 0.1 * u
        elif t.dim() >= 2:
            v = u * math.sqrt(3.0 / (t.numel() // t.shape[0]))
        elif name in ("weight", "scale"):  # norm weights and the learnable-affine scale
            v = 1.0 + 0.1 * u
        else:  # biases
            v = 0.1 * u
        out[key] = v.to(t.dtype)
    return out


def fill_checksum(state_dict: dict[str, torch.Tensor]) -> float:
    """Weighted sum of the filled tensors (the size-dependent, kept ones excluded)."""
    return float(sum(v.double().abs().sum() * (i + 1) for i, (k, v) in enumerate(sorted(state_dict.items()))
                     if _filled(k, v)))


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ModelConfig(size="n", task="detect", memory_fusion="none"), num_classes=80).eval()
    m.load_state_dict(golden_fill(m.state_dict()))
    return m


def test_fill_reproduces_the_generator_weights(model: torch.nn.Module, golden: dict) -> None:
    ours = fill_checksum(model.state_dict())
    assert ours == pytest.approx(golden["fill_checksum"], rel=1e-9)


@pytest.mark.parametrize("case", ["256x256", "256x320"])
def test_eval_outputs_equal_official(model: torch.nn.Module, golden: dict, case: str) -> None:
    ref = golden[case]
    images = ref["images"].float() / 255.0
    scores = []
    handle = model.decoder.enc_score_head.register_forward_hook(lambda _m, _i, o: scores.append(o.detach()))
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        handle.remove()
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    assert logits.shape == ref["pred_logits"].shape and boxes.shape == ref["pred_boxes"].shape

    k = logits.shape[1]
    ours_idx = scores[0].max(-1).values.topk(k, dim=1).indices
    perm = []
    for b in range(images.shape[0]):
        official = ref["topk_index"][b].tolist()
        assert set(official) == set(ours_idx[b].tolist()), "another set of encoder queries was selected"
        pos = {a: j for j, a in enumerate(ours_idx[b].tolist())}
        perm.append([pos[a] for a in official])
    perm_t = torch.tensor(perm)
    logits = logits.gather(1, perm_t[..., None].expand_as(logits))
    boxes = boxes.gather(1, perm_t[..., None].expand_as(boxes))

    assert (logits - ref["pred_logits"]).abs().max().item() < TOL
    assert (boxes - ref["pred_boxes"]).abs().max().item() < TOL
    # The check is only meaningful if the outputs are not trivial.
    assert ref["pred_logits"].std() > 0.1 and ref["pred_boxes"].std() > 0.05
