"""`pipelined` (infer/batching.py): forwards on a worker thread, results in input order, errors surfaced;
ONNX Runtime's throughput mode gives the same detections as its latency mode."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_predictor_standin import scene

from dfineseg.infer.batching import pipelined
from dfineseg.infer.predictor import Predictor


def test_results_come_back_in_order_while_the_next_batch_is_prepared():
    prepared_during_forward = []
    busy = threading.Event()

    def forward(batch):
        busy.set()
        time.sleep(0.02)
        busy.clear()
        return {"x": batch * 2}

    def batches():
        for i in range(6):
            prepared_during_forward.append(busy.is_set())
            yield np.full(3, i), f"ctx{i}"

    out = list(pipelined(forward, batches()))
    assert [ctx for _, ctx in out] == [f"ctx{i}" for i in range(6)]
    assert all((o["x"] == 2 * i).all() for i, (o, _) in enumerate(out))
    assert any(prepared_during_forward[1:])  # the producer ran while a forward was computing


def test_an_error_in_a_forward_reaches_the_caller():
    def forward(batch):
        if batch[0] == 2:
            raise RuntimeError("runtime failed on batch 2")
        return batch

    with pytest.raises(RuntimeError, match="batch 2"):
        list(pipelined(forward, ((np.array([i]), i) for i in range(5))))


def test_onnxruntime_throughput_mode_gives_the_latency_modes_detections(standin_files):
    frames = [(i, scene(60 + i)) for i in range(5)]
    results = {}
    for mode in ("latency", "throughput"):
        predictor = Predictor.load(standin_files.onnx, performance=mode)
        assert predictor.backend.pipeline == (mode == "throughput")
        results[mode] = [(key, det) for key, _, det in predictor.stream(iter(frames))]
    for (k1, a), (k2, b) in zip(results["latency"], results["throughput"], strict=True):
        assert k1 == k2
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
