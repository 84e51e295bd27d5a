"""Exact rewrites the exported graph inherits from eval mode: each RepVGG block as one 3x3 conv, the
finest level's dense fusion without its duplicated map (docs/BENCHMARKS.md, "Exact rewrites for the deploy
graph"), the concat-free stem, and the FPN's first convolution run before its upsample."""

from __future__ import annotations

import onnx
import torch
from onnx import numpy_helper

from dfineseg.export.onnx_export import export_onnx
from dfineseg.model import DFINESeg
from dfineseg.model.dfine import DeployModel
from dfineseg.model.encoder import HybridEncoder, RepNCSPELAN4, RepVGGBlock
from dfineseg.model.hgnetv2 import StemBlock


def _random_norm_statistics(module: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorms: identity statistics would hide a wrong fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.2)


def test_repvgg_block_in_eval_mode_is_its_two_branches_as_one_conv():
    torch.manual_seed(0)
    block = RepVGGBlock(8, 8)
    _random_norm_statistics(block)
    x = torch.randn(2, 8, 9, 7)
    block.eval()
    with torch.no_grad():
        branches = block.act(block.conv1(x) + block.conv2(x))
        fused = block(x)
    torch.testing.assert_close(fused, branches, atol=1e-5, rtol=1e-5)
    weight, _ = block.fused_kernel()
    assert weight.shape == (8, 8, 3, 3)
    # Training keeps the two branches (batch statistics), and their parameters get gradients.
    block.train()
    block(x).sum().backward()
    assert block.conv2.conv.weight.grad is not None and block.conv1.conv.weight.grad is not None


def test_exported_graph_has_one_conv_per_repvgg_block_and_a_two_part_finest_fusion(tmp_path):
    torch.manual_seed(0)
    model = DFINESeg("tiny", 3, "segment", num_queries=10, memory_fusion="dense")
    _random_norm_statistics(model)
    model.eval()
    path = tmp_path / "m.onnx"
    # Unsimplified: the folded kernels must be constants of the graph without onnxsim's help.
    export_onnx(DeployModel(model, topk=10).eval(), path, imgsz=(64, 64), simplify=False)
    graph = onnx.load(str(path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in weights for n in convs), [n.name for n in convs if n.input[1] not in weights]
    blocks = sum(isinstance(m, RepVGGBlock) for m in model.modules())
    assert blocks > 0
    in_blocks = [n for n in convs if "/bottlenecks/" in n.name]
    assert len(in_blocks) == blocks, [n.name for n in in_blocks]
    assert all(weights[n.input[1]].shape[2:] == (3, 3) for n in in_blocks)

    hidden = model.encoder.hidden_dim
    levels = len(model.encoder.fusion)
    shapes = [weights[n.input[1]].shape for n in convs if n.input[1] in weights]
    assert len(shapes) == len(convs)
    assert sum(s == (hidden, 3 * hidden, 1, 1) for s in shapes) == levels - 1  # the finest level: 2 parts
    assert sum(s == (hidden, 2 * hidden, 1, 1) for s in shapes) >= 1


def test_stem_in_eval_mode_convolves_its_two_parts_without_the_concat(tmp_path):
    torch.manual_seed(0)
    stem = StemBlock(3, 16, 16, use_lab=True)
    _random_norm_statistics(stem)
    stem.eval()
    x = torch.randn(2, 3, 33, 30)
    with torch.no_grad():
        y = torch.nn.functional.pad(stem.stem1(x), (0, 1, 0, 1))
        branch = stem.stem2b(torch.nn.functional.pad(stem.stem2a(y), (0, 1, 0, 1)))
        concat = stem.stem4(stem.stem3(torch.cat([stem.pool(y), branch], 1)))
        torch.testing.assert_close(stem(x), concat, atol=1e-5, rtol=1e-5)
    path = tmp_path / "stem.onnx"
    torch.onnx.export(stem, (x,), str(path), dynamo=False, opset_version=19)
    graph = onnx.load(str(path)).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # stem3 as two convolutions over the pooled map and the conv branch, summed; no conv reads a concat (the
    # graph's other Concat nodes only build F.pad's pad list).
    assert len(convs) == 6 and not [n.name for n in convs if made_by.get(n.input[0]) == "Concat"]
    weights = {init.name for init in graph.initializer}
    assert all(n.input[1] in weights for n in convs)  # the kernel slices are constants
    # Training keeps the concat form, and every weight slice gets its gradient through it.
    stem.train()
    stem(x).sum().backward()
    assert stem.stem3.conv.weight.grad is not None and stem.stem3.conv.weight.grad[:, :16].abs().sum() > 0


def test_fpn_block_in_eval_mode_convolves_the_coarse_map_before_upsampling_it(tmp_path):
    torch.manual_seed(0)
    block = RepNCSPELAN4(16, 8, 16, 4, 1)
    _random_norm_statistics(block)
    block.eval()
    coarse, fine = torch.randn(2, 8, 5, 4), torch.randn(2, 8, 10, 8)
    upsampled = torch.nn.functional.interpolate(coarse, scale_factor=2.0, mode="nearest")
    with torch.no_grad():
        torch.testing.assert_close(block(coarse, fine), block(torch.cat([upsampled, fine], 1)), atol=1e-5, rtol=1e-5)

    # The whole encoder, eval mode, against its training form (the concat) with the same running statistics.
    encoder = HybridEncoder([8, 16, 32], [8, 16, 32], hidden_dim=16, dim_feedforward=32, expansion=0.5,
                            depth_mult=0.34)
    _random_norm_statistics(encoder)
    feats = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)]
    encoder.eval()
    with torch.no_grad():
        rewritten = encoder(feats)
        for m in encoder.fpn_blocks:
            m.training = True  # only the blocks' own flag: their BatchNorms keep the running statistics
        concatenated = encoder(feats)
    for a, b in zip(rewritten, concatenated, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # In the exported graph no FPN convolution reads the upsampled map: the upsample follows a convolution.
    path = tmp_path / "fpn.onnx"
    torch.onnx.export(block, (coarse, fine), str(path), dynamo=False, opset_version=19)
    graph = onnx.load(str(path)).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 1 and made_by[resizes[0].input[0]] == "Conv"
    assert not [n.name for n in graph.node if n.op_type == "Conv" and made_by.get(n.input[0]) == "Resize"]
    # ... and the only convolution of a concat is cv4's (its four branches), not cv1's.
    assert [n.name for n in graph.node if n.op_type == "Conv" and made_by.get(n.input[0]) == "Concat"] == [
        "/cv4/conv/Conv"]
    assert all(n.input[1] in {i.name for i in graph.initializer} for n in graph.node if n.op_type == "Conv")
    # Training keeps the concatenation, and both halves of cv1's kernel get gradients through it.
    block.train()
    block(coarse, fine).sum().backward()
    grad = block.cv1.conv.weight.grad
    assert grad[:, :8].abs().sum() > 0 and grad[:, 8:].abs().sum() > 0


def test_decoder_in_eval_mode_samples_rows_of_the_memory_as_training_samples_its_maps(monkeypatch):
    """Eval mode (validation, every export) reads the cross-attention values as rows of the token memory
    (MSDeformableAttention._gather_rows); training samples per-level maps with grid_sample. Same decoder output."""
    torch.manual_seed(0)
    model = DFINESeg("tiny", 3, "segment", num_queries=20).eval()
    _random_norm_statistics(model)
    with torch.no_grad():
        for layer in model.decoder.decoder.layers:  # far-reaching offsets: points outside the maps too
            layer.cross_attn.sampling_offsets.weight.normal_(0, 0.5)
            layer.cross_attn.attention_weights.weight.normal_(0, 0.5)
    dec = model.decoder
    with torch.no_grad():
        pan, _ = model.features(torch.rand(2, 3, 96, 64))
        memory, shapes, maps = dec._flatten(pan)
        content = torch.randn(2, 20, memory.shape[-1])
        ref_unact = torch.randn(2, 20, 4)
        rows = dec._run_layers(content, ref_unact, memory, shapes, None)
        planes = dec._run_layers(content, ref_unact, dec._head_values(maps), shapes, None)
    for key in ("logits", "boxes", "hidden"):
        torch.testing.assert_close(rows[key][-1], planes[key][-1], atol=1e-5, rtol=1e-5)
    # The eval forward takes the row form (no grid_sample is called).
    calls = []
    original = torch.nn.functional.grid_sample
    monkeypatch.setattr(torch.nn.functional, "grid_sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert not calls
