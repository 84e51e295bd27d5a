"""The DINOv2 backbone (dfineseg/model/dinov2.py): official key layout, LoRA start and exact merge, the
feature pyramid's strides and widths, training a few steps, freezing with pretrained weights, export."""

from __future__ import annotations

import pytest
import torch

from dfineseg.model.dinov2 import (
    PRETRAIN_GRID,
    DinoV2Backbone,
    DinoV2ViT,
    DinoV2WeightsError,
    load_dinov2_weights,
    merge_lora,
)


def official_vit_keys(dim: int, depth: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the official torch-hub DINOv2 ViT/14 checkpoints (no registers), written out
    from the published architecture, independently of our module."""
    keys = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "ls1.gamma": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
            p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,),
            p + "ls2.gamma": (dim,),
        })
    return keys


@pytest.mark.parametrize(("variant", "dim"), [("dinov2_s", 384), ("dinov2_b", 768)])
def test_state_dict_keys_equal_the_official_checkpoints(variant, dim):
    own = {k: tuple(v.shape) for k, v in DinoV2ViT(variant).state_dict().items()}
    assert own == official_vit_keys(dim, 12)
    assert PRETRAIN_GRID == 37


def test_an_official_shaped_file_loads_key_for_key_and_others_are_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) for k, shape in official_vit_keys(384, 12).items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    vit = DinoV2ViT("dinov2_s", lora_rank=4)
    assert load_dinov2_weights(vit, path) == len(state)
    loaded = vit.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    renamed = dict(state)
    renamed["blocks.0.attn.qkv.weight_renamed"] = renamed.pop("blocks.0.attn.qkv.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(DinoV2WeightsError, match="blocks.0.attn.qkv.weight"):
        load_dinov2_weights(DinoV2ViT("dinov2_s"), tmp_path / "renamed.pth")
    with pytest.raises(DinoV2WeightsError, match="shape"):
        load_dinov2_weights(DinoV2ViT("dinov2_b"), path)


def _random_lora(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if ".lora." in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05


def test_lora_starts_at_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    plain = DinoV2Backbone("dinov2_t", [16, 32, 64, 128], lora_rank=0).eval()
    adapted = DinoV2Backbone("dinov2_t", [16, 32, 64, 128], lora_rank=4).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        base = plain(x)
        for a, b in zip(base, adapted(x), strict=True):
            torch.testing.assert_close(a, b)  # B = 0 at the start: the adapter changes nothing
        _random_lora(adapted)
        before = adapted(x)
        assert not torch.allclose(before[-1], base[-1])
        assert merge_lora(adapted) == 2 * 3  # qkv and proj in each of the 3 blocks
        after = adapted(x)
    assert not any(".lora." in k for k in adapted.state_dict())
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pyramid_gives_strides_8_16_32_with_the_replaced_stages_widths():
    bb = DinoV2Backbone("dinov2_t", [16, 32, 64, 128], return_idx=(1, 2, 3)).eval()
    with torch.no_grad():
        outs = bb(torch.rand(1, 3, 96, 160))  # neither side a multiple of 14: padded inside
    assert [tuple(o.shape) for o in outs] == [(1, 32, 12, 20), (1, 64, 6, 10), (1, 128, 3, 5)]


def test_position_embeddings_are_resampled_to_the_input_grid():
    vit = DinoV2ViT("dinov2_t")
    assert vit.position_embedding(37, 37) is vit.pos_embed
    assert tuple(vit.position_embedding(5, 7).shape) == (1, 1 + 35, 64)


def _dinov2_cfg(small_data, tmp_path, **model):
    from dfineseg.config import build_config

    return build_config({
        "data": {"path": str(small_data), "imgsz": 64, "workers": 0,
                 "augment": {"mosaic": {"p": 0.0}, "affine": {"p": 0.0}}},
        "model": {"size": "tiny", "backbone": "dinov2_t", "num_queries": 10, "num_denoising": 6, **model},
        "eval": {"plots": False, "batch": 2},
        "train": {"epochs": 1, "batch": 2, "project": str(tmp_path), "name": "dino", "warmup_iters": 1,
                  "ema_warmup": 2, "seed": 0, "tensorboard": False, "plot_images": 0, "val_every": 1},
    })


def test_a_dinov2_model_trains_from_random_weights_with_the_whole_backbone(small_data, tmp_path, capsys):
    from dfineseg.train.trainer import Trainer

    trainer = Trainer(_dinov2_cfg(small_data, tmp_path))
    best = trainer.fit()
    assert best.is_file()
    err = capsys.readouterr().err
    assert "the whole backbone trains" in err and "LoRA off" in err
    assert all(p.requires_grad for p in trainer.model.backbone.parameters())


def test_pretrained_dinov2_freezes_the_vit_and_trains_lora(small_data, tmp_path, capsys):
    from dfineseg.train.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in official_vit_keys(64, 3).items()}
    weights = tmp_path / "dinov2_tiny.pth"
    torch.save(state, weights)
    trainer = Trainer(_dinov2_cfg(small_data, tmp_path, backbone_weights=str(weights)))
    trainer.fit()
    vit = trainer.model.backbone.vit
    frozen = [n for n, p in vit.named_parameters() if not p.requires_grad]
    trained = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert frozen and all(".lora." not in n for n in frozen)
    assert trained and all(".lora." in n for n in trained)
    assert torch.equal(vit.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert "base ViT frozen, LoRA rank 4" in capsys.readouterr().err

    # Export: LoRA merged, ONNX and OpenVINO pass parity against the (merged) PyTorch model.
    import onnx
    from test_seed_switches import export_passes_parity

    paths = export_passes_parity(trainer.run_dir / "best.pt", small_data, tmp_path / "export", say=print)
    graph = onnx.load(str(paths["onnx"])).graph
    assert not any("lora" in n.name.lower() for n in list(graph.node) + list(graph.initializer))
    assert "LoRA: merged 6 adapters" in capsys.readouterr().out
