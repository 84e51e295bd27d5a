"""The OpenVINO-only rewrite of the deformable attention's sampling (export/openvino_rewrites.py): every decoder
layer's gather + weighted sum becomes one EmbeddingBagPackedSum, and the IR computes what PyTorch computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfineseg.export.onnx_export import export_onnx
from dfineseg.export.openvino_export import compile_openvino, compiled_forward, export_openvino
from dfineseg.model import DFINESeg
from dfineseg.model.dfine import DeployModel
from dfineseg.model.runner import graph_forward

ov = pytest.importorskip("openvino")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _sampling_products(model) -> int:
    """MatMuls still fed by a gathered table (the form the rewrite replaces)."""
    count = 0
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        src = op.input_value(1).get_node()
        if src.get_type_name() == "Reshape" and src.input_value(0).get_node().get_type_name() == "Gather":
            count += 1
    return count


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_every_decoder_layer_samples_through_one_embedding_bag_and_matches_pytorch(tmp_path, dynamic_batch):
    torch.manual_seed(0)
    model = DFINESeg("tiny", 3, "segment", num_queries=20).eval()
    with torch.no_grad():
        for layer in model.decoder.decoder.layers:  # far-reaching offsets: points outside the maps too
            layer.cross_attn.sampling_offsets.weight.normal_(0, 0.5)
            layer.cross_attn.attention_weights.weight.normal_(0, 0.5)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(DeployModel(model, topk=10).eval(), onnx_path, imgsz=(64, 96), dynamic_batch=dynamic_batch)
    converted = ov.Core().read_model(str(onnx_path))
    assert _sampling_products(converted) == len(model.decoder.decoder.layers)  # the form the rewrite expects

    info = export_openvino(onnx_path, tmp_path / "ir", compress_fp16=False, metadata={})
    ir = ov.Core().read_model(str(info.xml))
    bags = [op for op in ir.get_ops() if op.get_type_name() == "EmbeddingBagPackedSum"]
    # A dynamic batch keeps the gather form: OpenVINO's CPU plugin cannot compile a bag of dynamic shape.
    layers = len(model.decoder.decoder.layers)
    assert info.sampling_bags == len(bags) == (0 if dynamic_batch else layers)
    assert _sampling_products(ir) == (layers if dynamic_batch else 0)

    batch = np.random.default_rng(0).random((2 if dynamic_batch else 1, 3, 64, 96), dtype=np.float32)
    got = compiled_forward(compile_openvino(info.xml, "f32"))(batch)
    want = graph_forward(model, "segment", topk=10)(batch)
    for name, expected in want.items():
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got[name], expected, atol=1e-4, rtol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], expected, err_msg=name)
