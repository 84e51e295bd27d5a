"""FP32 ONNX -> FP16 ONNX with float32 inputs/outputs and precision-sensitive parts kept in float32.

TensorRT 11 builds strongly typed networks (no FP16 builder flag), so FP16 must be in the graph itself.
Written with `onnx` alone (onnxconverter-common is not a dependency).

What stays float32, and why:
- ops in `KEEP_FP32` (normalisation and softmax: LayerNorm overflows in FP16, the distribution softmax
  loses the bins' resolution), locally: Casts around each such node;
- nodes whose name matches `KEEP_FP32_NAMES` (none by default) and every node downstream of them in the
  float data flow: a region that runs in float32 as a whole, with Casts only where it meets the float16
  part. Measured on the trained test fixture: keeping the decoder (`(^|/)decoder/`, with box decoding,
  top-k and the query mask embedding downstream of it) in float32 did not change the deviation from
  PyTorch (sorted scores 0.0113 vs 0.0111); casting the input alone to float16 moves them by 0.003 and
  1e-4 of input noise by 0.013, so that model's FP16 deviation is its own input sensitivity, which the
  parity checks' noise floor measures (export/tolerances.py). The official D-FINE engines run the whole
  network in FP16; the switch is here for a model that needs it;
- inputs the ONNX spec fixes to float32 (Resize scales), and ops with no float16 form (Range).
Graph inputs and outputs stay float32. Every tensor's type is tracked, so a Cast is inserted only where
a producer's type differs from what a consumer needs, and shared by all such consumers.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dfineseg.export.errors import ExportError

KEEP_FP32 = frozenset(
    {"LayerNormalization", "Softmax", "LogSoftmax", "BatchNormalization", "InstanceNormalization", "GroupNormalization"}
)
# Node-name patterns (regular expressions) that start a float32 region. The exporter names nodes by
# module path: r"(^|/)decoder/" keeps the decoder and everything after it.
KEEP_FP32_NAMES: tuple[str, ...] = ()
# (op_type, input index) whose type the ONNX spec fixes to float32 whatever the data type is.
FP32_ONLY_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})
# Ops that read their input's type or shape without float arithmetic: fed whatever type it has.
ANY_TYPE_INPUT = frozenset({"Shape", "Size", "Cast"})

_FP16_MAX = float(np.finfo(np.float16).max)


def _to_fp16_array(arr: np.ndarray) -> np.ndarray:
    # Finite values beyond the fp16 range (masking constants such as float32 max) saturate instead of
    # becoming inf, so `x * mask` never turns into inf * 0 = NaN.
    out = np.where(np.isfinite(arr), np.clip(arr, -_FP16_MAX, _FP16_MAX), arr)
    return out.astype(np.float16)


def _tensor_to_fp16(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(_to_fp16_array(arr), t.name)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _schema_needs(node: onnx.NodeProto, opset: int) -> tuple[bool, set[int]]:
    """(the op has no float16 form, its inputs whose type the spec fixes to float32), from the ONNX schema."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # unknown/custom op: leave its types alone
        return False, set()
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    no_fp16 = False
    fixed: set[int] = set()
    formals = list(schema.inputs)
    for i in range(len(node.input)):
        if not formals:
            break
        formal = formals[min(i, len(formals) - 1)]  # variadic inputs repeat the last formal
        if formal.type_str == "tensor(float)":
            fixed.add(i)
        elif formal.type_str in allowed:
            types = allowed[formal.type_str]
            if "tensor(float)" in types and "tensor(float16)" not in types:
                no_fp16 = True
    return no_fp16, fixed


def convert_to_fp16(
    model: onnx.ModelProto, keep_fp32: frozenset[str] = KEEP_FP32, keep_fp32_names: tuple[str, ...] = KEEP_FP32_NAMES
) -> onnx.ModelProto:
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model = model_copy
    graph = model.graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ExportError(f"FP16 conversion: node {node.name or node.op_type} has a subgraph ({node.op_type}); not supported")

    # The float32 tensors of the original graph (everything else -- ints, bools -- is left alone).
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_type: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        elem_type[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        elem_type[init.name] = init.data_type
    for node in graph.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    elem_type.setdefault(node.output[0], attr.t.data_type)

    def is_float(name: str) -> bool:
        return elem_type.get(name) == TensorProto.FLOAT

    # 1. Which nodes compute in float32. Graph nodes are in topological order, so one pass propagates
    #    the name-kept regions downstream.
    opset = _opset(model)
    name_patterns = [re.compile(p) for p in keep_fp32_names]
    region: set[str] = set()  # float tensors produced inside a float32 region
    fp32_node: list[bool] = []
    fixed_inputs: list[set[int]] = []
    for node in graph.node:
        no_fp16, fixed = _schema_needs(node, opset)
        in_region = any(p.search(node.name) for p in name_patterns) or any(
            name in region for name in node.input if name and is_float(name)
        )
        if in_region:
            region.update(o for o in node.output if is_float(o))
        fp32_node.append(in_region or node.op_type in keep_fp32 or no_fp16)
        fixed_inputs.append(fixed | {i for (op, i) in FP32_ONLY_INPUTS if op == node.op_type})

    # 2. The type each consumer needs for each float input.
    needs: dict[str, set[int]] = {}
    for n, node in enumerate(graph.node):
        if node.op_type in ANY_TYPE_INPUT:
            continue
        for i, name in enumerate(node.input):
            if name and is_float(name):
                want = TensorProto.FLOAT if (fp32_node[n] or i in fixed_inputs[n]) else TensorProto.FLOAT16
                needs.setdefault(name, set()).add(want)
    graph_outputs = {o.name for o in graph.output}

    def majority_type(name: str) -> int:
        """For a value with no producing computation (initializer, Constant, Cast): the type that saves casts."""
        wanted = needs.get(name, set())
        return TensorProto.FLOAT if wanted == {TensorProto.FLOAT} or (not wanted and name in graph_outputs) \
            else TensorProto.FLOAT16

    # 3. The type every float tensor has after conversion.
    dtype: dict[str, int] = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            dtype[inp.name] = TensorProto.FLOAT
    new_inits = []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and majority_type(init.name) == TensorProto.FLOAT16:
            new_inits.append(_tensor_to_fp16(init))
            dtype[init.name] = TensorProto.FLOAT16
        else:
            new_inits.append(init)
            if init.data_type == TensorProto.FLOAT:
                dtype[init.name] = TensorProto.FLOAT
    del graph.initializer[:]
    graph.initializer.extend(new_inits)

    casts: dict[tuple[str, int], str] = {}  # (tensor, type) -> the cast tensor, shared by consumers

    def cast_to(name: str, to: int, out_nodes: list[onnx.NodeProto]) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__{'fp32' if to == TensorProto.FLOAT else 'fp16'}"
            out_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"fp16_cast_{len(casts)}"))
            casts[key] = out
        return casts[key]

    new_nodes: list[onnx.NodeProto] = []
    for n, node in enumerate(graph.node):
        float_outputs = [o for o in node.output if o and is_float(o)]
        if node.op_type == "Constant":
            out_type = majority_type(node.output[0])
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT \
                        and out_type == TensorProto.FLOAT16:
                    attr.t.CopyFrom(_tensor_to_fp16(attr.t))
        elif node.op_type == "Cast" and float_outputs:
            # A Cast to float32 produces whichever type its consumers want (shape arithmetic feeding
            # Range stays exact; a Cast into the float16 part becomes a Cast to float16).
            out_type = TensorProto.FLOAT if fp32_node[n] else majority_type(node.output[0])
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = out_type
        else:
            out_type = TensorProto.FLOAT if fp32_node[n] else TensorProto.FLOAT16
            if out_type == TensorProto.FLOAT16:
                for attr in node.attribute:  # ConstantOfShape's value, and the like
                    if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                        attr.t.CopyFrom(_tensor_to_fp16(attr.t))
        for i, name in enumerate(node.input):
            if not name or not is_float(name) or name not in dtype or node.op_type in ANY_TYPE_INPUT:
                continue
            want = TensorProto.FLOAT if (fp32_node[n] or i in fixed_inputs[n]) else TensorProto.FLOAT16
            if dtype[name] != want:
                node.input[i] = cast_to(name, want, new_nodes)
        for name in float_outputs:
            dtype[name] = out_type
        new_nodes.append(node)

    # Graph outputs stay float32: a float16 producer writes to an internal name and a Cast restores it.
    for out in graph.output:
        name = out.name
        if out.type.tensor_type.elem_type != TensorProto.FLOAT or dtype.get(name) != TensorProto.FLOAT16:
            continue
        internal = f"{name}__fp16"
        for node in new_nodes:
            for j, o in enumerate(node.output):
                if o == name:
                    node.output[j] = internal
            for j, i in enumerate(node.input):
                if i == name:
                    node.input[j] = internal
        new_nodes.append(helper.make_node("Cast", [internal], [name], to=TensorProto.FLOAT,
                                          name=f"fp16_cast_output_{name}"))

    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"FP16 conversion produced an invalid graph: {exc}") from exc
    return model
