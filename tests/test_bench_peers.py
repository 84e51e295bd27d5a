"""The Ultralytics YOLO-seg peer runner: its end-to-end layout becomes our graph contract."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfineseg.benchmarks.peers import (
    PeerModelError,
    YoloSegRunner,
    pair_ratios,
    paired_round_ratios,
    yolo_end_to_end_to_contract,
)
from dfineseg.infer.postprocess import postprocess
from dfineseg.infer.preprocess import preprocess


def _yolo_like_onnx(path, dets: np.ndarray, protos: np.ndarray, size: int = 64) -> None:
    """A graph with YOLO26-seg's end-to-end outputs (constants, made to depend on the input)."""
    zero = helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0)
    times0 = helper.make_node("Mul", ["mean", "zero"], ["z"])
    out0 = helper.make_node("Add", ["dets_c", "z"], ["output0"])
    out1 = helper.make_node("Add", ["protos_c", "z"], ["output1"])
    graph = helper.make_graph(
        [zero, times0, out0, out1], "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(dets.shape)),
         helper.make_tensor_value_info("output1", TensorProto.FLOAT, list(protos.shape))],
        [numpy_helper.from_array(dets, "dets_c"), numpy_helper.from_array(protos, "protos_c"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _peer_outputs(size=64, k=5, m=4):
    rng = np.random.default_rng(0)
    dets = np.zeros((1, k, 6 + m), np.float32)
    dets[0, 0, :6] = [8, 8, 40, 32, 0.9, 2]       # a confident detection, class 2
    dets[0, 1, :6] = [10, 10, 20, 20, 0.1, 1]     # below threshold
    dets[0, :, 6:] = rng.normal(size=(k, m))
    protos = rng.normal(size=(1, m, size // 4, size // 4)).astype(np.float32)
    return dets, protos


def test_layout_conversion_matches_the_formula():
    dets, protos = _peer_outputs()
    out = yolo_end_to_end_to_contract([dets, protos], (64, 64))
    np.testing.assert_allclose(out["boxes"][0, 0], [8 / 64, 8 / 64, 40 / 64, 32 / 64])
    assert out["labels"].dtype == np.int64 and out["labels"][0, 0] == 2
    expected = np.tensordot(dets[0, 3, 6:], protos[0], axes=(0, 0))
    logits = out["mask_features"][0] @ out["mask_embed"][0, 3]  # the product post-processing takes
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_onnx_peer_runs_through_our_postprocess(tmp_path):
    dets, protos = _peer_outputs()
    path = tmp_path / "yolo26n-seg.onnx"
    _yolo_like_onnx(path, dets, protos)
    runner = YoloSegRunner(path)
    assert runner.input_hw == (64, 64) and runner.resize == "letterbox"
    image = np.full((48, 96, 3), 127, np.uint8)
    batch, metas = preprocess([image], runner.input_hw, runner.resize)
    result = postprocess(runner.forward(batch), metas, conf=0.5)[0]
    assert len(result) == 1 and result.labels[0] == 2
    # letterbox of 48x96 into 64x64: scale 2/3, pad_y 16 -> box (8,8,40,32) maps to (12, -12, 60, 24) clipped
    np.testing.assert_allclose(result.boxes[0], [12, 0, 60, 24], atol=1e-4)


def test_wrong_layout_is_explained(tmp_path):
    with pytest.raises(PeerModelError, match="end-to-end"):
        yolo_end_to_end_to_contract([np.zeros((1, 84, 8400), np.float32)[..., :4].reshape(1, 4, 84)[:, :, :4]], (64, 64))
    with pytest.raises(PeerModelError, match="not found"):
        YoloSegRunner(tmp_path / "missing.onnx")


def test_paired_round_ratios_separate_quiet_and_loaded_rounds():
    """Four quiet rounds (ours 3 % slower) and four loaded ones (ours 20 % slower): the paired statistics show
    both, where the ratio of the medians blends them into a number no round had."""
    peer = [10.0, 20.0, 10.0, 20.0, 10.0, 20.0, 10.0, 20.0]
    ours = [10.3, 24.0, 10.3, 24.0, 10.3, 24.0, 10.3, 24.0]
    r = paired_round_ratios(ours, peer)
    assert r["quiet"] == pytest.approx(1.03) and r["p10"] == pytest.approx(1.03) and r["p90"] == pytest.approx(1.2)
    assert r["median"] == pytest.approx((1.03 + 1.2) / 2)
    rows = [{"model": "ours", "int8_ms": 17.15, "int8_rounds_ms": ours}, {"model": "peer", "int8_ms": 15.0, "int8_rounds_ms": peer}]
    (ratio,) = pair_ratios(rows, [("ours", "peer")])
    assert ratio["int8"] == pytest.approx(17.15 / 15.0) and ratio["int8_rounds"] == r
    assert ratio["f32"] is None and "f32_rounds" not in ratio  # a column not measured stays empty
    with pytest.raises(ValueError, match="same rounds"):
        paired_round_ratios(ours[:3], peer)
