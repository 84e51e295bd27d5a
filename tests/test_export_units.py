"""Export building blocks on small graphs: the row sampler, FP16 conversion, LayerNorm form, TensorRT guard."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx.reference import ReferenceEvaluator
from torch import nn

from dfineseg.export.errors import ExportBackendUnavailable, ExportError
from dfineseg.export.fp16 import convert_to_fp16
from dfineseg.export.onnx_export import decomposed_layernorms, export_onnx, op_counts
from dfineseg.model.decoder import MSDeformableAttention, memory_value_maps

# The TorchScript exporter warns that it is deprecated on every call; it is the one chosen (native LN, one file).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class SmallDeploy(nn.Module):
    """DeployModel-shaped stand-in: conv, LayerNorm, deformable sampling of the feature tokens, float arange,
    top-K, pixel features (NHWC) and per-query mask embeddings."""

    def __init__(self, classes: int = 3, queries: int = 12, k: int = 5, dim: int = 8) -> None:
        super().__init__()
        self.k = k
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.ReLU(), nn.Conv2d(dim, dim, 3, 2, 1))
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = MSDeformableAttention(dim, 2, [3])
        self.cls = nn.Linear(dim, classes)
        self.box = nn.Linear(dim, 4)

    def forward(self, images: torch.Tensor):
        feat = self.stem(images)
        b, d, h, w = feat.shape
        pos = torch.arange(w, dtype=torch.float32) / w  # shape arithmetic in float (Range in the graph)
        feat = feat + pos.view(1, 1, 1, w)
        q = self.query.unsqueeze(0).expand(b, -1, -1)
        ref = self.box(q).sigmoid()
        q = self.norm(q + self.attn(q, ref, feat.flatten(2).transpose(1, 2), [(h, w)]))
        scores, labels = self.cls(q).sigmoid().max(-1)
        scores, idx = scores.topk(self.k, dim=1)
        cxcywh = self.box(q).sigmoid().gather(1, idx[..., None].expand(-1, -1, 4))
        boxes = torch.cat([cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1)
        embed = q.gather(1, idx[..., None].expand(-1, -1, d))
        return scores, labels.gather(1, idx), boxes, feat.permute(0, 2, 3, 1), embed


class RowSampling(nn.Module):
    """The deformable attention's sampling alone: (memory [B,N,D], locs [B,Q,heads,P,2], weights) -> [B,Q,D]."""

    def __init__(self, attn: MSDeformableAttention, shapes: list[tuple[int, int]]):
        super().__init__()
        self.attn, self.shapes = attn, shapes

    def forward(self, memory: torch.Tensor, locs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.attn._gather_rows(memory, locs, weights, self.shapes)


def _attention(dim: int, heads: int, points: list[int], seed: int = 0) -> MSDeformableAttention:
    attn = MSDeformableAttention(dim, heads, points)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # offsets that reach past the map edges: zeros padding matters
        attn.sampling_offsets.weight.copy_(torch.randn(attn.sampling_offsets.weight.shape, generator=g))
        attn.attention_weights.weight.copy_(torch.randn(attn.attention_weights.weight.shape, generator=g))
    return attn.eval()


def _run(path, **feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_row_sampler_equals_grid_sample_in_torch_and_onnxruntime(tmp_path):
    """Eval mode samples rows of the token memory; training samples per-level maps with grid_sample: the same
    function, also as an ONNX graph (no GridSample) in ONNX Runtime."""
    shapes, heads, dim = [(6, 5), (3, 3)], 2, 8
    attn = _attention(dim, heads, [2, 3])
    g = torch.Generator().manual_seed(1)
    query, ref = torch.randn(2, 7, dim, generator=g), torch.rand(2, 7, 4, generator=g)
    memory = torch.randn(2, sum(h * w for h, w in shapes), dim, generator=g)
    maps = memory_value_maps(memory, shapes, heads)  # what training samples: per level [B*heads, D/heads, H, W]
    with torch.no_grad():
        rows = attn(query, ref, memory, shapes)
        planes = attn(query, ref, maps, shapes)
    torch.testing.assert_close(rows, planes, atol=1e-5, rtol=1e-5)

    total = 5
    locs = torch.rand(2, 7, heads, total, 2, generator=g) * 1.6 - 0.3  # partly outside the map
    weights = torch.rand(2, 7, heads, total, generator=g)
    path = tmp_path / "rows.onnx"
    with torch.no_grad():
        expected = RowSampling(attn, shapes)(memory, locs, weights)
        torch.onnx.export(RowSampling(attn, shapes), (memory, locs, weights), str(path), dynamo=False,
                          opset_version=19, input_names=["memory", "locs", "weights"], output_names=["out"])
    counts = op_counts(onnx.load(str(path)))
    assert "GridSample" not in counts and counts.get("Gather", 0) >= 1
    out, = _run(path, memory=memory.numpy(), locs=locs.numpy(), weights=weights.numpy())
    assert np.abs(out - expected.numpy()).max() <= 1e-5


def test_row_sampler_reads_the_right_pixel_of_a_large_map_in_fp16(tmp_path):
    """A stride-8 map at 640 has 6,400 pixels (x heads rows): an index computed in fp16 (spacing 4 above 4096)
    would read a neighbour. The FP16 ONNX (TensorRT's input) must sample the same pixels as float32."""
    h, w, heads, dim = 128, 64, 2, 4  # powers of two: every pixel centre below is exact in fp16
    attn = _attention(dim, heads, [1])
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(1, h * w, dim, generator=g)  # unstructured: a neighbour's value is unrelated
    # Pixel centres in the far part of the map (row index > 8,192), where fp16 cannot hold every integer.
    ys = torch.randint(100, h, (1, 16, heads, 1), generator=g).float()
    xs = torch.randint(0, w, (1, 16, heads, 1), generator=g).float()
    locs = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1)  # [1, 16, heads, 1, 2]
    weights = torch.ones(1, 16, heads, 1)
    sampler = RowSampling(attn, [(h, w)])
    path = tmp_path / "rows.onnx"
    with torch.no_grad():
        reference = sampler(memory, locs, weights)
        torch.onnx.export(sampler, (memory, locs, weights), str(path), dynamo=False, opset_version=19,
                          input_names=["memory", "locs", "weights"], output_names=["out"])
    # The exact pixels, read directly: the sampler is right in float32 first.
    tokens = (ys * w + xs).long()[0, :, :, 0]  # [16, heads]
    direct = memory[0].reshape(h * w, heads, dim // heads)[tokens, torch.arange(heads)].reshape(16, dim)
    torch.testing.assert_close(reference[0], direct)
    half = tmp_path / "rows_fp16.onnx"
    onnx.save(convert_to_fp16(onnx.load(str(path))), str(half))
    # ONNX Runtime's CPU kernels upcast fp16 arithmetic to float32 between casts, which hides the rounding a
    # GPU runtime does; ONNX's reference evaluator computes every fp16 node in fp16, as TensorRT does.
    out, = ReferenceEvaluator(onnx.load(str(half))).run(
        None, {"memory": memory.numpy(), "locs": locs.numpy(), "weights": weights.numpy()})
    # fp16 rounding of the values themselves is ~1e-3; a wrong pixel is off by O(1).
    assert np.abs(out.astype(np.float32) - reference.numpy()).max() <= 1e-2


class GridSampleDeploy(SmallDeploy):
    """The stand-in sampling through grid_sample, as a training-mode trace would."""

    def forward(self, images: torch.Tensor):
        out = super().forward(images)
        grid = torch.zeros(images.shape[0], 1, 1, 2)
        extra = F.grid_sample(out[3].permute(0, 3, 1, 2), grid, align_corners=False).flatten(1)
        return (out[0] + extra[:, :1] * 0, *out[1:])


def test_export_onnx_refuses_a_graph_with_gridsample(tmp_path):
    with pytest.raises(ExportError, match="GridSample"):
        export_onnx(GridSampleDeploy().eval(), tmp_path / "m.onnx", imgsz=(64, 64), simplify=False)


def test_layernorm_is_native_at_opset_17_and_decomposed_form_is_detected(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()
    x = torch.rand(2, 4)
    found = {}
    for opset in (16, 17):
        path = tmp_path / f"ln{opset}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset)
        proto = onnx.load(str(path))
        found[opset] = (op_counts(proto).get("LayerNormalization", 0), decomposed_layernorms(proto))
    assert found[16] == (0, 1)
    assert found[17] == (1, 0)
    with pytest.raises(ExportError, match="opset >= 17"):
        export_onnx(model, tmp_path / "x.onnx", imgsz=(32, 32), opset=16)


def test_fp16_onnx_has_float32_io_keeps_layernorm_fp32_and_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = SmallDeploy().eval()
    info = export_onnx(model, tmp_path / "m.onnx", imgsz=(64, 96), dynamic_batch=True, simplify=False)
    fp32 = onnx.load(str(info.path))
    assert "Range" in op_counts(fp32)  # the float arange survived: the converter must keep it float32
    fp16 = convert_to_fp16(fp32)
    path16 = tmp_path / "m16.onnx"
    onnx.save(fp16, str(path16))

    elem = {i.name: i.type.tensor_type.elem_type for i in list(fp16.graph.input) + list(fp16.graph.output)}
    assert elem == {"images": 1, "scores": 1, "labels": 7, "boxes": 1, "mask_features": 1, "mask_embed": 1}
    weights = {t.name: t.data_type for t in fp16.graph.initializer}
    conv_w = [n.input[1] for n in fp16.graph.node if n.op_type == "Conv"]
    assert conv_w and all(weights[w] == onnx.TensorProto.FLOAT16 for w in conv_w)
    producers = {o: n for n in fp16.graph.node for o in n.output}
    # The float Ranges (the sampler's integer Ranges stay integer in any precision).
    inferred = onnx.shape_inference.infer_shapes(fp32)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t.data_type for t in fp32.graph.initializer})
    for n in fp32.graph.node:
        if n.op_type == "Constant":
            types[n.output[0]] = n.attribute[0].t.data_type
    float_ranges = {n.name for n in fp32.graph.node if n.op_type == "Range" and types.get(n.input[0]) == onnx.TensorProto.FLOAT}
    assert float_ranges
    for node in fp16.graph.node:
        if node.op_type == "LayerNormalization" or node.name in float_ranges:
            src = producers.get(node.input[0])
            x_is_fp32 = (src is not None and src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT) or (
                weights.get(node.input[0]) == onnx.TensorProto.FLOAT
            ) or (src is not None and src.op_type == "Constant" and src.attribute[0].t.data_type == onnx.TensorProto.FLOAT)
            assert x_is_fp32, f"{node.op_type} {node.name} is not fed float32"
        if node.op_type == "LayerNormalization":
            assert weights[node.input[1]] == onnx.TensorProto.FLOAT

    x = np.random.default_rng(0).random((3, 3, 64, 96), dtype=np.float32)
    ref = _run(info.path, images=x)
    got = _run(path16, images=x)
    assert got[1].dtype == np.int64 and got[0].dtype == np.float32
    for name, a, b in zip(("scores", "labels", "boxes", "mask_features", "mask_embed"), ref, got):
        if name == "labels":
            continue
        scale = max(1.0, float(np.abs(a).max()))
        assert np.abs(a - b).max() <= 1e-2 * scale, name


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: guard not exercised")
def test_tensorrt_export_says_it_is_unavailable(tmp_path):
    from dfineseg.export.tensorrt_export import build_engine

    with pytest.raises(ExportBackendUnavailable, match="tensorrt package is not installed"):
        build_engine(tmp_path / "m.onnx", None, tmp_path / "m.engine", imgsz=(64, 64), batch=1,
                     dynamic_batch=False, metadata={})


def test_tensorrt_engine_builds_on_a_gpu(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it needs an NVIDIA GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    from dfineseg.export.tensorrt_export import build_engine

    info = export_onnx(SmallDeploy().eval(), tmp_path / "m.onnx", imgsz=(64, 64), dynamic_batch=True, simplify=False)
    onnx.save(convert_to_fp16(onnx.load(str(info.path))), str(tmp_path / "m16.onnx"))
    engine = build_engine(info.path, tmp_path / "m16.onnx", tmp_path / "m.engine", imgsz=(64, 64), batch=1,
                          dynamic_batch=True, max_batch=4, workspace_gb=1.0, metadata={"task": "segment"})
    assert engine.path.stat().st_size > 0 and engine.sidecar.is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: guard not exercised")
def test_export_command_with_tensorrt_fails_up_front_saying_why(tmp_path):
    from dfineseg.config import build_config
    from dfineseg.export.api import export_model
    from dfineseg.infer.errors import UserError

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"not read: the toolchain check comes first")
    cfg = build_config({"export": {"formats": ["onnx", "tensorrt"]}})
    with pytest.raises(UserError, match="TensorRT export is not possible here"):
        export_model(weights, cfg, say=None)
    assert not list(tmp_path.glob("*.onnx")), "nothing is exported when a requested format cannot be made"


def _region_graph() -> onnx.ModelProto:
    """images -> Conv (backbone) -> Relu, Add (decoder) -> Mul (tail) -> out; the Conv output also feeds
    two LayerNorms, which each want it in float32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "bias"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.full((1,), 1.5, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["feat"], name="/backbone/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("LayerNormalization", ["feat", "gamma"], ["ln1"], name="/encoder/ln1", axis=-1),
        helper.make_node("LayerNormalization", ["feat", "gamma"], ["ln2"], name="/encoder/ln2", axis=-1),
        helper.make_node("Add", ["ln1", "ln2"], ["enc"], name="/encoder/Add"),
        helper.make_node("Relu", ["enc"], ["r"], name="/decoder/Relu"),
        helper.make_node("Add", ["r", "bias"], ["d"], name="/decoder/Add"),
        helper.make_node("Mul", ["d", "scale"], ["out"], name="/Mul"),
    ]
    graph = helper.make_graph(
        nodes, "region", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_fp16_keeps_a_named_region_and_everything_after_it_in_float32(tmp_path):
    fp32 = _region_graph()
    fp16 = convert_to_fp16(fp32, keep_fp32_names=(r"(^|/)decoder/",))
    by_name = {n.name: n for n in fp16.graph.node}
    producers = {o: n for n in fp16.graph.node for o in n.output}
    weights = {t.name: t.data_type for t in fp16.graph.initializer}
    assert weights["w"] == onnx.TensorProto.FLOAT16  # the backbone computes in float16
    assert weights["bias"] == weights["scale"] == weights["gamma"] == onnx.TensorProto.FLOAT
    # The decoder's input is cast to float32 once; inside the region and after it, no more casts.
    relu_src = producers[by_name["/decoder/Relu"].input[0]]
    assert relu_src.op_type == "Cast" and relu_src.attribute[0].i == onnx.TensorProto.FLOAT
    assert by_name["/decoder/Add"].input[0] == "r" and by_name["/Mul"].input[0] == "d"
    assert producers["out"].name == "/Mul"  # already float32: no cast at the output
    # Both LayerNorms read one shared float32 copy of the float16 feature map.
    ln_inputs = {by_name["/encoder/ln1"].input[0], by_name["/encoder/ln2"].input[0]}
    assert len(ln_inputs) == 1 and producers[ln_inputs.pop()].op_type == "Cast"
    casts = [n for n in fp16.graph.node if n.op_type == "Cast"]
    # images->16, feat->32 (shared by both LayerNorms), ln1->16, ln2->16, and enc->32 into the decoder
    assert len(casts) == 5, [(c.input[0], c.output[0]) for c in casts]

    onnx.save(fp32, str(tmp_path / "a.onnx"))
    onnx.save(fp16, str(tmp_path / "b.onnx"))
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    a, b = _run(tmp_path / "a.onnx", images=x)[0], _run(tmp_path / "b.onnx", images=x)[0]
    assert b.dtype == np.float32 and np.abs(a - b).max() <= 2e-2 * max(1.0, float(np.abs(a).max()))
    # Without the region everything after the Conv runs in float16 and the output gets its cast back.
    plain = convert_to_fp16(fp32)
    assert {n.name for n in plain.graph.node if n.op_type == "Cast" and n.output[0] == "out"}


def _hand_made_f1_case(n_images: int):
    from dfineseg.export.parity_data import ParityData
    from dfineseg.infer.detections import Detections
    from dfineseg.infer.metrics import GroundTruth

    shape = (64, 64)
    gt = [GroundTruth(np.array([[10, 10, 30, 30]], np.float32), np.array([0]), shape) for _ in range(n_images)]
    data = ParityData(images=[np.zeros((*shape, 3), np.uint8)] * n_images, ground_truth=gt, source="hand-made",
                      imgsz=(64, 64), resize="stretch", task="detect", conf=0.5)

    def dets(scores, boxes=None):
        boxes = boxes or [[10, 10, 30, 30]] * len(scores)
        return [Detections(np.array([b], np.float32), np.array([s], np.float32), np.array([0]), shape)
                if s is not None else Detections.empty(shape) for s, b in zip(scores, boxes)]

    return data, dets


def test_f1_check_sets_threshold_borderline_detections_aside_but_not_real_changes():
    from dfineseg.export.parity_checks import check_f1
    from dfineseg.export.parity_data import f1_of
    from dfineseg.export.tolerances import Tolerance

    # 10 images, one object each; PyTorch finds 9 of them, one of which scores 0.505 (just above 0.5).
    data, dets = _hand_made_f1_case(10)
    torch_dets = dets([0.9] * 8 + [0.505, None])
    tol = Tolerance(raw=0.01, f1=0.003)  # score tolerance 0.01; no one-decision allowance (not fp16)
    # The artefact scores the borderline one 0.495: it drops below the threshold, F1 moves by ~0.06.
    flipped = dets([0.9] * 8 + [0.495, None])
    plain = check_f1(f1_of(torch_dets, data), f1_of(flipped, data), tol)
    assert not plain.passed and plain.value > 0.05
    judged = check_f1(f1_of(torch_dets, data), f1_of(flipped, data), tol, torch_dets, flipped, data)
    assert judged.passed and judged.value == 0.0
    assert judged.detail["change"] == pytest.approx(plain.detail["change"])
    # A confident detection lost is a real change, whatever the borderline rule says.
    lost = dets([0.9] * 7 + [None, 0.505, None])
    check = check_f1(f1_of(torch_dets, data), f1_of(lost, data), tol, torch_dets, lost, data)
    assert not check.passed and check.value > 0.05


def test_fp16_f1_limit_allows_one_ground_truth_match_flip_not_two():
    from dfineseg.export.parity_checks import check_f1
    from dfineseg.export.parity_data import f1_of
    from dfineseg.export.tolerances import TOLERANCES

    # 200 objects, PyTorch finds 150 (TP 150, FN 50). A box that slides off its object (IoU < 0.5) turns a
    # TP into an FP and an FN: F1 moves by 2 / (2 TP + FP + FN) = 2 / 350.
    data, dets = _hand_made_f1_case(200)
    scores = [0.9] * 150 + [None] * 50
    torch_dets = dets(scores)
    shifted = [[10, 10, 30, 30]] * 200
    one = dets(scores, [[22, 22, 42, 42]] + shifted[1:])
    two = dets(scores, [[22, 22, 42, 42]] * 2 + shifted[2:])
    tol = TOLERANCES["fp16"]
    check_one = check_f1(f1_of(torch_dets, data), f1_of(one, data), tol, torch_dets, one, data)
    assert check_one.detail["one_decision"] == pytest.approx(2 / 350)
    assert check_one.passed and check_one.value > tol.f1
    check_two = check_f1(f1_of(torch_dets, data), f1_of(two, data), tol, torch_dets, two, data)
    assert not check_two.passed


def test_int8_f1_limit_allows_the_drops_sampling_noise_and_still_fails_a_real_loss():
    """INT8's drop on a small validation split moves with which images were drawn (~0.01 on 60 images, as
    much as the whole budget): the limit grows by z standard errors of the drop, which shrink with more
    images, and a loss beyond the budget plus that noise still fails."""
    from dfineseg.export.parity_checks import check_f1, drop_limit
    from dfineseg.export.parity_data import f1_of, image_counts
    from dfineseg.export.tolerances import int8_tolerance
    from dfineseg.infer.metrics import PaperMetrics, f1_difference_se

    # 60 images with one object each; PyTorch finds 40 (F1 0.8). INT8 loses one detection: drop 0.012.
    data, dets = _hand_made_f1_case(60)
    torch_dets = dets([0.9] * 40 + [None] * 20)
    one_lost = dets([0.9] * 39 + [None] * 21)
    ref, got = f1_of(torch_dets, data), f1_of(one_lost, data)
    counts = PaperMetrics(torch_dets, data.ground_truth, "detect").outcome(0.5).image_counts
    assert counts.shape == (60, 3) and tuple(counts.sum(0)) == (ref["tp"], ref["fp"], ref["fn"])
    as_measured = check_f1(ref, got, int8_tolerance(0.01, 0.5), torch_dets, one_lost, data)
    assert not as_measured.passed and as_measured.limit == pytest.approx(0.01)  # z = 0 at confidence 0.5
    noisy = check_f1(ref, got, int8_tolerance(0.01, 0.95), torch_dets, one_lost, data)
    se = noisy.detail["sampling_se"]
    assert 0.005 < se < 0.03 and noisy.detail["sampling_images"] == 60
    assert noisy.passed and noisy.limit == pytest.approx(0.01 + 1.6449 * se, rel=1e-3)
    # Without the detections (no per-image counts) the limit stays the budget.
    assert check_f1(ref, got, int8_tolerance(0.01, 0.95)).limit == 0.01
    # Six detections lost (drop 0.077): a real loss beyond budget plus noise fails.
    six_lost = dets([0.9] * 34 + [None] * 26)
    real = check_f1(ref, f1_of(six_lost, data), int8_tolerance(0.01, 0.95), torch_dets, six_lost, data)
    assert not real.passed and real.value > real.limit
    # Ten times the images with the same pattern: the error shrinks by ~sqrt(10) and the limit with it.
    a, b = image_counts(torch_dets, data), image_counts(one_lost, data)
    wide = f1_difference_se(np.tile(a, (10, 1)), np.tile(b, (10, 1)))
    assert wide == pytest.approx(se / np.sqrt(10), rel=0.25)
    assert f1_difference_se(a, a) == 0.0
    assert drop_limit(0.01, 0.95, np.tile(a, (10, 1)), np.tile(b, (10, 1))).limit < noisy.limit


def test_detections_check_counts_two_empty_masks_as_the_same_answer():
    from dfineseg.export.parity_checks import check_detections
    from dfineseg.export.tolerances import TOLERANCES
    from dfineseg.infer.detections import Detections

    shape = (32, 32)

    def one(mask):
        return Detections(np.array([[4, 4, 12, 12]], np.float32), np.array([0.9], np.float32), np.array([0]), shape,
                          masks=[mask], mask_origins=np.array([[4, 4]]))

    empty, full = np.zeros((8, 8), bool), np.ones((8, 8), bool)
    assert check_detections([one(empty)], [one(empty.copy())], 0.5, TOLERANCES["fp32"]).passed
    assert check_detections([one(full)], [one(full.copy())], 0.5, TOLERANCES["fp32"]).passed
    check = check_detections([one(full)], [one(empty)], 0.5, TOLERANCES["fp32"])
    assert not check.passed and check.detail["pairs_below_iou"] == 1


def test_fp16_outputs_check_judges_queries_that_can_become_detections():
    """FP16 judges the top-K entries PyTorch scores at least half the threshold (chaotic background queries
    far below it are reported, not judged); FP32 judges every entry from RELEVANT_SCORE up."""
    from dfineseg.export.parity_checks import check_outputs
    from dfineseg.export.tolerances import TOLERANCES

    scores = np.array([[0.9, 0.4, 0.08, 0.05]], np.float32)
    boxes = np.array([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.2, 0.6, 0.4, 0.8], [0.6, 0.1, 0.8, 0.3]]],
                     np.float32)
    ref = {"scores": scores, "labels": np.zeros((1, 4), np.int64), "boxes": boxes}

    def moved(indices: tuple[int, ...], by: float) -> dict[str, np.ndarray]:
        got = {k: v.copy() for k, v in ref.items()}
        got["boxes"][0, list(indices)] += by
        return got

    # (With 4 entries one may be a swap at the encoder's top-K boundary: each case moves two.)
    # Both background queries (0.08 and 0.05, far below conf 0.5) move by 0.05: reported, not judged, in FP16.
    background = check_outputs(ref, moved((2, 3), 0.05), TOLERANCES["fp16"], conf=0.5)
    assert background.passed and background.detail["max_abs_paired_not_judged"] == pytest.approx(0.05, abs=1e-6)
    assert background.detail["judged_min_score"] == pytest.approx(0.25)
    # The same move on the queries at 0.9 and 0.4 (within a factor of two of the threshold) fails.
    near = check_outputs(ref, moved((0, 1), 0.05), TOLERANCES["fp16"], conf=0.5)
    assert not near.passed and near.value == pytest.approx(0.05, abs=1e-6)
    # FP32 judges the background queries too (its arithmetic has no excuse).
    strict = check_outputs(ref, moved((2, 3), 0.05), TOLERANCES["fp32"], conf=0.5)
    assert not strict.passed


def test_a_selection_swap_on_one_image_is_reported_but_on_most_images_fails():
    """A near-tie at the encoder's top-K swaps a query and nudges the others of that image (self-attention):
    on one image in eight that is reported, not judged; the same difference on every image is a broken
    artefact and fails."""
    from dfineseg.export.parity_checks import check_outputs
    from dfineseg.export.tolerances import TOLERANCES

    rng = np.random.default_rng(0)
    n, k = 8, 10
    xy = rng.uniform(0.0, 0.5, (n, k, 2)).astype(np.float32)
    ref = {"scores": np.sort(rng.uniform(0.3, 0.95, (n, k)).astype(np.float32), axis=1)[:, ::-1].copy(),
           "labels": np.zeros((n, k), np.int64), "boxes": np.concatenate([xy, xy + 0.2], -1)}

    def disturbed(images: list[int]) -> dict[str, np.ndarray]:
        got = {name: v.copy() for name, v in ref.items()}
        for b in images:
            got["boxes"][b, 0] = [0.7, 0.7, 0.9, 0.9]  # the swapped-in candidate: another query entirely
            got["boxes"][b, 1:] += 0.005  # the knock-on on the image's other queries
        return got

    one = check_outputs(ref, disturbed([5]), TOLERANCES["fp32"], conf=0.5)
    assert one.passed and one.detail["images_with_selection_swaps"] == 1, one
    assert one.detail["max_abs_on_swap_images_not_judged"] == pytest.approx(0.005, abs=1e-6)
    every = check_outputs(ref, disturbed(list(range(n))), TOLERANCES["fp32"], conf=0.5)
    assert not every.passed and every.value == pytest.approx(0.005, abs=1e-6), every


def test_detections_noise_floor_is_per_kind_a_wobbly_box_does_not_excuse_a_lost_detection():
    """PyTorch's own boxes wobble under input noise (small objects: box IoU < 0.99) without any detection
    appearing or vanishing; that floor must not let an artefact lose detections."""
    from dfineseg.export.parity_checks import apply_noise_floor, check_detections
    from dfineseg.export.parity_data import Reference
    from dfineseg.export.tolerances import TOLERANCES

    n = 10
    data, dets = _hand_made_f1_case(n)
    data.n_raw = n
    torch_dets = dets([0.9] * n)
    wobbly = dets([0.9] * n, boxes=[[11, 10, 31, 30]] * n)  # every box one pixel off: IoU ~0.9
    outputs = {"scores": np.full((n, 1), 0.9, np.float32), "labels": np.zeros((n, 1), np.int64),
               "boxes": np.tile(np.array([[[10, 10, 30, 30]]], np.float32) / 64, (n, 1, 1))}

    def noisy(amplitude, seed):
        return Reference(outputs, [], None, wobbly, None, 0.0)

    ref = Reference(outputs, [], None, torch_dets, None, 0.0, perturb=noisy)
    tol = TOLERANCES["fp16"]

    def judged(got):
        checks = [check_detections(torch_dets, got, data.conf, tol)]
        apply_noise_floor(checks, ref, data, tol)
        return checks[0]

    same_wobble = judged(wobbly)
    assert same_wobble.passed and same_wobble.detail["noise_floor_parts"] == {"pairs_below_iou": 10, "unmatched": 0}
    lost = judged(dets([0.9] * 7 + [None] * 3))  # three confident detections gone, the rest exact
    assert not lost.passed and lost.detail["unmatched"] == 3, lost
    # (One floor for the sum, 10, would have allowed up to 20 lost detections.)
    assert lost.value <= 2 * same_wobble.detail["noise_floor"]


# ------------------------------------------------------------------------------------------ the format registry
def test_the_registry_plans_each_format_and_option_in_build_order():
    from dfineseg.export.formats import planned_artefacts

    assert planned_artefacts(["onnx"], False, False) == ["onnx"]
    assert planned_artefacts(["onnx"], True, True) == ["onnx", "onnx_fp16"]  # int8 is OpenVINO's
    assert planned_artefacts(["openvino"], True, True) == ["openvino", "openvino_fp16", "openvino_int8"]
    # TensorRT 11 parses the FP16 ONNX: it is made with the engine, half or not.
    assert planned_artefacts(["tensorrt"], False, False) == ["onnx_fp16", "tensorrt"]
    # The order is the registry's (what each artefact is built from comes first), not the request's.
    assert planned_artefacts(["tensorrt", "openvino", "onnx"], False, True) == [
        "onnx", "onnx_fp16", "openvino", "openvino_int8", "tensorrt"]
    assert planned_artefacts([], True, True) == []


def test_the_registry_names_every_file_an_export_may_write():
    from dfineseg.export.formats import ARTEFACTS
    from dfineseg.export.publish import output_names

    assert {k: (a.name, a.failed) for k, a in ARTEFACTS.items()} == {
        "onnx": ("model.onnx", "model.failed.onnx"),
        "onnx_fp16": ("model_fp16.onnx", "model_fp16.failed.onnx"),
        "openvino": ("openvino", "openvino.failed"),
        "openvino_fp16": ("openvino_fp16", "openvino_fp16.failed"),
        "openvino_int8": ("openvino_int8", "openvino_int8.failed"),
        "tensorrt": ("model.engine", "model.failed.engine"),
    }
    assert output_names(["openvino", "tensorrt"]) == [
        "openvino", "openvino.failed", "model.engine", "model.engine.parity.json", "model.engine.json",
        "model.failed.engine", "model.failed.engine.parity.json", "model.failed.engine.json", "export_summary.json"]


def test_every_build_step_and_toolchain_check_of_the_registry_exists():
    """The registry names its steps as strings (imported when used): a typo would surface mid-export."""
    import importlib

    from dfineseg.export.formats import ARTEFACTS, FORMATS, OPTIONS
    from dfineseg.export.tolerances import TOLERANCES

    targets = [a.build for a in ARTEFACTS.values()]
    targets += [t for f in FORMATS.values() for t in f.requires] + [t for o in OPTIONS.values() for t in o.requires]
    for target in targets:
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    for artefact in ARTEFACTS.values():
        assert artefact.format in FORMATS and artefact.tolerance in {*TOLERANCES, "int8"}, artefact
        assert artefact.when == "always" or artefact.when in OPTIONS, artefact
    assert all(k in ARTEFACTS for f in FORMATS.values() for k in f.needs)


def test_bench_rows_and_config_values_come_from_the_registry():
    import subprocess
    import sys
    from typing import get_args

    from dfineseg.config import BENCH_FORMATS, ConfigError, ExportConfig, build_config
    from dfineseg.export.formats import BENCH_ROWS

    assert get_args(get_args(ExportConfig.model_fields["formats"].annotation)[0]) == ("onnx", "openvino", "tensorrt")
    assert get_args(BENCH_FORMATS) == ("torch", "onnx", "onnx-fp16", "ov-fp32", "ov-fp16", "ov-int8", "trt-fp16")
    runs = {name: (artefact.entry if artefact else None, dict(row.options), artefact and artefact.export_settings())
            for name, (row, artefact) in BENCH_ROWS.items()}
    assert runs == {
        "torch": (None, {}, None),
        "onnx": ("model.onnx", {}, {"formats": ["onnx"]}),
        "onnx-fp16": ("model_fp16.onnx", {}, {"formats": ["onnx"], "half": True}),
        "ov-fp32": ("openvino/model.xml", {"precision": "f32"}, {"formats": ["openvino"]}),
        "ov-fp16": ("openvino_fp16/model.xml", {}, {"formats": ["openvino"], "half": True}),
        "ov-int8": ("openvino_int8/model.xml", {}, {"formats": ["openvino"], "int8": True}),
        "trt-fp16": ("model.engine", {"device": "cuda"}, {"formats": ["tensorrt"]}),
    }
    with pytest.raises(ConfigError, match="'onnx', 'openvino' or 'tensorrt'"):
        build_config({"export": {"formats": "onnx,tflite"}})
    # The config reads the registry without importing a runtime: `import dfineseg.config` stays light.
    heavy = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt")
    code = f"import sys, dfineseg.config; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_int8_without_openvino_is_refused_before_any_work(tmp_path):
    pytest.importorskip("nncf")
    from dfineseg.config import build_config
    from dfineseg.export.api import export_model

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"not read: the request is refused first")
    cfg = build_config({"export": {"formats": ["onnx"], "int8": True, "out": str(tmp_path / "out")}})
    with pytest.raises(ExportError, match="export.int8=true quantises the OpenVINO model: add openvino to format="):
        export_model(weights, cfg, say=None)
    assert not (tmp_path / "out").exists()


def test_export_f1_uses_the_nms_that_val_bench_and_infer_apply():
    """A DETR can answer one object twice; `val`, `bench` and `infer` remove the duplicate (eval.nms_iou), so the
    F1 an export reports (parity, INT8 accuracy control) must too, or it prints a lower F1 than users get."""
    from dfineseg.config import Config
    from dfineseg.export.parity_data import detections_for, f1_of

    data, _ = _hand_made_f1_case(3)

    def forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        box = np.array([10, 10, 30, 30], np.float32) / 64.0
        return {"scores": np.full((n, 2), 0.9, np.float32), "labels": np.zeros((n, 2), np.int64),
                "boxes": np.tile(box, (n, 2, 1)) + np.array([0.0, 0.005], np.float32)[None, :, None]}

    assert data.nms_iou is None
    twice = f1_of(detections_for(forward, data, None), data)
    assert twice["f1"] == pytest.approx(2 / 3)  # precision 0.5, recall 1
    data.nms_iou = Config().eval.nms_iou
    assert data.nms_iou is not None
    once = f1_of(detections_for(forward, data, None), data)
    assert once["f1"] == pytest.approx(1.0)
    # The export takes it from the config it runs with.
    from types import SimpleNamespace

    from dfineseg.export.api import load_data

    cfg = Config()
    cfg.eval.nms_iou = 0.55
    cfg.export.parity_images = 2
    opened = SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(path=None)))
    plan = SimpleNamespace(imgsz=(64, 64), resize="stretch", task="segment", conf=0.5, int8=False)
    loaded, _ = load_data(cfg, opened, plan, say=lambda _msg: None)
    assert loaded.nms_iou == 0.55
