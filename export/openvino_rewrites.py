"""Rewrites of a converted OpenVINO model into operations ONNX cannot express (same function, faster on a CPU).

The deformable attention's sampling exports as `MatMul(weights [..., 1, K], Reshape(Gather(table, rows)) [..., K,
C])`: K corner rows of the token memory per query and head, gathered, then weighted and summed
(`MSDeformableAttention._gather_rows`). OpenVINO has that operation as one node, `EmbeddingBagPackedSum`
(per bag, the weighted sum of the table's rows at its K indices), which never materialises the K x C gathered rows:
on S at 640 px the gather (a reference kernel copying 115,200 rows of 32 floats per layer) and the product took
~1.4 ms per decoder layer, the bag ~0.6 ms (docs/BENCHMARKS.md). ONNX has no such operation, so the rewrite is
done here, on the converted model, before it is saved (and so before INT8 quantisation reads it). Static shapes
only: a dynamic-batch export keeps the gather and the product (OpenVINO cannot compile a dynamic bag).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fuse_sampling_bags(model: Any) -> int:
    """Replace each `MatMul(w, Reshape(Gather(table, index, axis 0)))` of the sampling form by an
    `EmbeddingBagPackedSum`; returns how many were replaced (the model is changed in place)."""
    import openvino.opset13 as ops

    replaced = 0
    for matmul in [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]:
        match = _sampling_form(matmul)
        if match is None:
            continue
        weights, table, index, per_bag, out_shape = match
        bags = ops.constant([-1, per_bag], dtype=np.int64)
        summed = ops.embedding_bag_packed_sum(table, ops.reshape(index, bags, special_zero=False),
                                              ops.reshape(weights, bags, special_zero=False))
        result = ops.reshape(summed, ops.constant(out_shape, dtype=np.int64), special_zero=False)
        result.set_friendly_name(matmul.get_friendly_name())
        summed.set_friendly_name(matmul.get_friendly_name() + "/bag")
        matmul.output(0).replace(result.output(0))
        replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced


def _sampling_form(matmul: Any) -> tuple[Any, Any, Any, int, list[int]] | None:
    """(weights, table, index, rows per bag K, output shape) when `matmul` is the sampling's weighted sum with
    static shapes, else None."""
    if matmul.get_transpose_a() or matmul.get_transpose_b():
        return None
    weights, gathered = matmul.input_value(0), matmul.input_value(1)
    reshape = gathered.get_node()
    if reshape.get_type_name() != "Reshape":
        return None
    gather = reshape.input_value(0).get_node()
    if gather.get_type_name() != "Gather" or gather.get_batch_dims() != 0:
        return None
    axis = gather.input_value(2).get_node()
    if axis.get_type_name() != "Constant" or [int(a) for a in axis.get_vector()] != [0]:
        return None
    table, index = gather.input_value(0), gather.input_value(1)
    # OpenVINO's CPU plugin refuses to compile an EmbeddingBagPackedSum of dynamic shape (2026.4: "to_shape was
    # called on a dynamic shape"), so a dynamic-batch export keeps the gather and the product.
    parts = (weights.get_partial_shape(), gathered.get_partial_shape(), table.get_partial_shape(),
             index.get_partial_shape(), matmul.get_output_partial_shape(0))
    if any(p.is_dynamic for p in parts):
        return None
    w, g, t, i, out = ([d.get_length() for d in p] for p in parts)
    # weights [..., 1, K] against rows [..., K, C]: one bag of K rows per leading index.
    if len(t) != 2 or len(i) != 1 or len(w) < 3 or w[-2] != 1 or len(g) < 2 or g[-2] != w[-1]:
        return None
    return weights, table, index, w[-1], out
