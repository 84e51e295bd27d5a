"""FP32 ONNX -> FP16 ONNX with float32 inputs/outputs and precision-sensitive ops kept in float32.

TensorRT 11 builds strongly typed networks (no FP16 builder flag), so FP16 must be in the graph itself.
Written with `onnx` alone (onnxconverter-common is not a dependency). Every float tensor becomes
float16; the ops in `KEEP_FP32` (normalisation and softmax: LayerNorm overflows in FP16, the
distribution softmax loses the bins' resolution) get Casts around them, graph inputs and outputs stay
float32 with a Cast at the boundary, and float inputs that ONNX fixes to float32 (Resize scales)
are fed a float32 tensor.
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
# Node-name patterns to keep in float32 (none by default). Keeping the decoder in float32 is the next
# step for FP16 parity on trained models, but a kept node currently rounds its outputs back to float16
# and a name-kept node may meet a float32-kept initializer with an un-inferred float16 input: needs
# dtype tracking per tensor before it can be switched on.
KEEP_FP32_NAMES: tuple[str, ...] = ()
# (op_type, input index) whose type the ONNX spec fixes to float32 whatever the data type is.
FP32_ONLY_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})

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

    inferred = onnx.shape_inference.infer_shapes(model)
    elem_type: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        elem_type[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        elem_type[init.name] = init.data_type

    def is_float(name: str) -> bool:
        return elem_type.get(name) == TensorProto.FLOAT

    # Per node: kept in float32 (listed, or its schema has no float16 form, e.g. Range), and which of
    # its inputs must be float32 whatever the rest is (Resize scales).
    opset = _opset(model)
    name_patterns = [re.compile(p) for p in keep_fp32_names]
    kept: list[bool] = []
    fixed_inputs: list[set[int]] = []
    for node in graph.node:
        no_fp16, fixed = _schema_needs(node, opset)
        kept.append(node.op_type in keep_fp32 or no_fp16 or any(p.search(node.name) for p in name_patterns))
        fixed_inputs.append(fixed | {i for (op, i) in FP32_ONLY_INPUTS if op == node.op_type})

    fp32_uses: dict[str, int] = {}
    all_uses: dict[str, int] = {}
    for n, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            if not name:
                continue
            all_uses[name] = all_uses.get(name, 0) + 1
            if kept[n] or i in fixed_inputs[n]:
                fp32_uses[name] = fp32_uses.get(name, 0) + 1

    # Initializers read only by float32 consumers stay float32 (LayerNorm gamma/beta): no cast needed.
    stay_fp32 = {n for n, k in fp32_uses.items() if k == all_uses.get(n)}
    new_inits = []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in stay_fp32:
            new_inits.append(_tensor_to_fp16(init))
        else:
            new_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    init_names = {i.name for i in graph.initializer}

    kept_casts: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                if node.output[0] in stay_fp32:
                    # Read only by float32 consumers (e.g. shape arithmetic into Range): stay exact.
                    kept_casts.add(node.output[0])
                else:
                    attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                if node.op_type in ("Constant", "ConstantOfShape"):
                    attr.t.CopyFrom(_tensor_to_fp16(attr.t))
    # A Constant feeding only float32-only inputs keeps float32, like initializers.
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in stay_fp32:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                    arr = numpy_helper.to_array(attr.t).astype(np.float32)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))

    fixed_fp32 = (stay_fp32 & (init_names | {n.output[0] for n in graph.node if n.op_type == "Constant"})) | kept_casts
    counter = [0]

    def cast(src: str, to: int, hint: str) -> tuple[onnx.NodeProto, str]:
        counter[0] += 1
        out = f"{src}__{hint}{counter[0]}"
        return helper.make_node("Cast", [src], [out], to=to, name=f"fp16_cast_{counter[0]}"), out

    new_nodes: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}  # graph input/output name -> the float16 tensor used inside
    origin: dict[str, str] = {}  # that float16 tensor -> the original name (whose type we inferred)
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT and inp.name not in init_names:
            node, out = cast(inp.name, TensorProto.FLOAT16, "fp16")
            new_nodes.append(node)
            renamed[inp.name] = out
            origin[out] = inp.name
    float_outputs = [o.name for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    for name in float_outputs:
        renamed[name] = f"{name}__fp16"
        origin[f"{name}__fp16"] = name

    for n, node in enumerate(graph.node):
        keep = kept[n]
        pre: list[onnx.NodeProto] = []
        post: list[onnx.NodeProto] = []
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in renamed:
                node.input[i] = name = renamed[name]
            needs_fp32 = keep or i in fixed_inputs[n]
            original = origin.get(name, name)
            if needs_fp32 and is_float(original) and original not in fixed_fp32:
                c, out = cast(name, TensorProto.FLOAT, "fp32")
                pre.append(c)
                node.input[i] = out
        for j, name in enumerate(node.output):
            if name in renamed:
                node.output[j] = name = renamed[name]
            if keep and is_float(origin.get(name, name)):
                internal = f"{name}__fp32out"
                node.output[j] = internal
                post.append(
                    helper.make_node("Cast", [internal], [name], to=TensorProto.FLOAT16, name=f"fp16_cast_out_{name}")
                )
        new_nodes.extend(pre)
        new_nodes.append(node)
        new_nodes.extend(post)
    for name in float_outputs:
        new_nodes.append(
            helper.make_node("Cast", [renamed[name]], [name], to=TensorProto.FLOAT, name=f"fp16_cast_output_{name}")
        )

    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"FP16 conversion produced an invalid graph: {exc}") from exc
    return model
