"""Parameter groups, learning-rate schedules and the EMA (no data, no training loop)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfineseg.config import Config
from dfineseg.train.ema import ModelEMA
from dfineseg.train.optim import (
    LRSchedule,
    build_optimizer,
    build_param_groups,
    lr_factor,
    resolve_optim_settings,
)


class _Toy(nn.Module):
    """Names as the real model has them: HGNetv2 `.bn.`, lab scale/bias, encoder `.norm`, biases."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.conv = nn.Module()
        self.backbone.conv.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.backbone.conv.bn = nn.BatchNorm2d(4)
        self.backbone.conv.lab = nn.Module()
        self.backbone.conv.lab.scale = nn.Parameter(torch.ones(1))
        self.backbone.conv.lab.bias = nn.Parameter(torch.zeros(1))
        self.encoder = nn.Module()
        self.encoder.proj = nn.Linear(4, 4)
        self.encoder.norm = nn.LayerNorm(4)
        self.decoder = nn.Module()
        self.decoder.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)


def _groups_by_param(model: nn.Module, cfg) -> dict[str, dict]:
    settings = resolve_optim_settings(cfg.train, "n")
    groups = build_param_groups(model, settings)
    out = {}
    for name, p in model.named_parameters():
        for g in groups:
            if any(p is q for q in g["params"]):
                out[name] = g
    return out


def test_param_groups_lower_backbone_lr_and_no_decay_on_norms_and_biases():
    model = _Toy()
    by_param = _groups_by_param(model, Config())
    # Official N: lr 8e-4, backbone 4e-4, wd 1e-4.
    assert by_param["backbone.conv.conv.weight"]["lr"] == pytest.approx(4e-4)
    assert by_param["backbone.conv.conv.weight"]["weight_decay"] == pytest.approx(1e-4)
    assert by_param["encoder.proj.weight"]["lr"] == pytest.approx(8e-4)
    assert by_param["encoder.proj.weight"]["weight_decay"] == pytest.approx(1e-4)
    for name in ("backbone.conv.bn.weight", "backbone.conv.bn.bias", "backbone.conv.lab.scale",
                 "backbone.conv.lab.bias", "encoder.proj.bias", "encoder.norm.weight", "encoder.norm.bias"):
        assert by_param[name]["weight_decay"] == 0.0, name
    assert "decoder.up" not in by_param  # frozen parameters are not optimised


def test_user_lr_keeps_official_backbone_ratio_and_sizes_differ():
    cfg = Config()
    cfg.train.lr = 1e-3
    s = resolve_optim_settings(cfg.train, "n")
    assert (s.lr, s.backbone_lr) == pytest.approx((1e-3, 5e-4))
    m = resolve_optim_settings(Config().train, "m")
    assert (m.lr, m.backbone_lr) == pytest.approx((2e-4, 2e-5))
    x = resolve_optim_settings(Config().train, "x")
    assert x.weight_decay == pytest.approx(1.25e-4)


def test_flat_cosine_shape():
    total, warm = 1000, 100
    f = [lr_factor(s, total, "flatcosine", warm, flat_frac=0.5, min_lr_frac=0.05) for s in range(total + 1)]
    assert f[0] < 0.02 and f[warm // 2] == pytest.approx((warm // 2 + 1) / (warm + 1))
    assert all(v == 1.0 for v in f[warm:501])  # flat
    assert f[750] == pytest.approx(0.05 + 0.95 * 0.5, rel=1e-6)  # cosine midpoint
    assert f[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[500:], f[501:]))  # monotone decay


def test_onecycle_and_constant_shapes():
    total = 100
    one = [lr_factor(s, total, "onecycle", 0) for s in range(total + 1)]
    peak = max(range(total + 1), key=lambda s: one[s])
    assert one[0] == pytest.approx(1 / 25) and one[peak] == pytest.approx(1.0) and 25 <= peak <= 35
    assert one[-1] == pytest.approx(0.05 / 25)
    const = [lr_factor(s, total, "constant", 10) for s in range(total + 1)]
    assert const[0] < const[5] < const[10] == const[-1] == 1.0


def test_schedule_state_roundtrip_and_refit():
    model = _Toy()
    cfg = Config()
    cfg.train.warmup_iters = 5
    opt = build_optimizer(model, cfg.train, "n")
    sched = LRSchedule(opt, cfg.train, total_steps=60)
    for _ in range(37):
        sched.step()
    state = sched.state_dict()
    lrs = [g["lr"] for g in opt.param_groups]
    opt2 = build_optimizer(_Toy(), cfg.train, "n")
    sched2 = LRSchedule(opt2, cfg.train, total_steps=999)
    sched2.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(lrs)
    # A time budget that shortens the run refits the remaining decay from the current step.
    sched.set_total(40)
    assert sched.factor() < lr_factor(37, 60, "flatcosine", 5)


def test_ema_warmup_ramp_and_average():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.9, warmup=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    d1 = 0.9 * (1 - math.exp(-1 / 10))
    assert ema.current_decay() == pytest.approx(d1)
    assert ema.module.weight.detach() == pytest.approx(torch.full((1, 2), 1 - d1))
    for _ in range(500):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9, rel=1e-6)
    assert torch.allclose(ema.module.weight, torch.ones(1, 2), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_copies_integer_buffers():
    model = nn.BatchNorm1d(3)
    ema = ModelEMA(model, decay=0.99, warmup=0)
    model.train()
    model(torch.randn(8, 3))
    ema.update(model)
    assert int(ema.module.num_batches_tracked) == 1


def test_ema_horizon_caps_the_window_of_short_runs():
    model = nn.Linear(2, 1, bias=False)
    short = ModelEMA(model, decay=0.9998, warmup=10, horizon=0.1, total_steps=200)
    long = ModelEMA(model, decay=0.9998, warmup=10, horizon=0.1, total_steps=10**6)
    short.updates = long.updates = 150
    assert short.current_decay() == pytest.approx(1 - 1 / 20)  # averages over at most 10% of 200 steps
    assert long.current_decay() == pytest.approx(0.9998 * (1 - math.exp(-15)))  # official decay untouched


def test_ema_keeps_inf_buffers_intact_even_at_zero_decay():
    """decoder.anchors holds +inf at invalid cells; averaging would give inf*0 = NaN."""
    model = nn.Linear(2, 1)
    model.register_buffer("anchors", torch.tensor([1.0, float("inf")]))
    ema = ModelEMA(model, decay=0.9, warmup=10, horizon=0.1, total_steps=4)  # window < 1 step: decay 0
    ema.update(model)
    assert ema.current_decay() == 0.0
    assert torch.equal(ema.module.anchors, model.anchors)
    assert torch.equal(ema.module.weight, model.weight)


def test_ema_follows_in_place_updates_and_reassigned_buffers():
    """Parameters are tracked by reference (built once), so in-place optimizer updates must reach the EMA;
    a buffer the model re-assigns (a new tensor object) must still be found, and a new model object (another
    run) must not be averaged against the first one's tensors."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    model.register_buffer("scale", torch.zeros(3))
    ema = ModelEMA(model, decay=0.5, warmup=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        model.weight.grad = torch.full_like(model.weight, -1.0)  # w += 1 in place
        opt.step()
        model.scale = torch.full((3,), 4.0)  # re-assigned, not copied into
        ema.update(model)
    # w: 0 -> 1 -> 2 (model); EMA 0 -> 0.5 -> 1.25. Buffer: 0 -> 2 -> 3.
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.25))
    assert torch.allclose(ema.module.scale, torch.full((3,), 3.0))
    other = nn.Linear(2, 1, bias=False)
    other.register_buffer("scale", torch.full((3,), 3.0))
    with torch.no_grad():
        other.weight.fill_(3.25)
    ema.update(other)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2.25))
