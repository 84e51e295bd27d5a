"""On the trained fixture: every CPU backend gives the same Detections as the PyTorch checkpoint.

Slow (it exports the fixture's checkpoint to ONNX and OpenVINO), so marked `slow`. `trained_run` is the
session fixture conftest.py registers.
"""

from __future__ import annotations

import pytest
from test_predictor_standin import assert_matching_detections

from dfineseg.infer.io import read_image
from dfineseg.infer.predictor import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from dfineseg.export.api import export_model
    from dfineseg.model.checkpoint import config_from_checkpoint, load_checkpoint

    cfg = config_from_checkpoint(load_checkpoint(trained_run.checkpoint))
    cfg.export.formats = ["onnx", "openvino"]
    cfg.export.parity = False  # parity is the exporter's own test; here the Predictor is under test
    cfg.export.dynamic_batch = True
    cfg.export.out = str(tmp_path_factory.mktemp("trained_export"))
    return export_model(trained_run.checkpoint, cfg, say=None)


@pytest.fixture(scope="module")
def val_images(trained_run):
    from dfineseg.data import load_index

    index = load_index(trained_run.data_yaml, "val")
    return [read_image(rec.file) for rec in index.images[:6]]


def test_exported_backends_match_the_checkpoint(trained_run, exported, val_images):
    reference = Predictor.load(trained_run.checkpoint)
    ref = reference.predict(val_images)
    assert sum(len(d) for d in ref) > 0, "the trained fixture detects nothing: the comparison would prove nothing"
    for key, options in (("onnx", {}), ("openvino", {"precision": "f32"})):
        predictor = Predictor.load(exported[key], **options)
        assert predictor.names == reference.names and predictor.category_ids == reference.category_ids
        assert predictor.conf == pytest.approx(reference.conf)
        matched = 0
        for got, want in zip(predictor.predict(val_images), ref):
            matched += assert_matching_detections(got, want, conf=reference.conf)
        assert matched >= 0.9 * sum(len(d) for d in ref), key
