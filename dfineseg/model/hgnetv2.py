"""HGNetv2 backbone (PP-HGNetV2 as used by D-FINE).

Module and attribute names follow the official D-FINE layout so checkpoints load key for key:
`stem.stem1.conv/bn/lab`, `stages.{i}.downsample`, `stages.{i}.blocks.{j}.layers.{k}`,
`stages.{i}.blocks.{j}.aggregation.{0,1}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StageSpec:
    in_ch: int
    mid_ch: int
    out_ch: int
    blocks: int
    downsample: bool
    light: bool
    kernel: int
    layers: int


def _stages(*rows: tuple) -> tuple[StageSpec, ...]:
    return tuple(StageSpec(*r) for r in rows)


# name -> (stem in/mid/out, four stages). B0..B5 per the official table; T0 is our narrow test backbone.
ARCHS: dict[str, tuple[tuple[int, int, int], tuple[StageSpec, ...]]] = {
    "B0": ((3, 16, 16), _stages(
        (16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
        (256, 64, 512, 2, True, True, 5, 3), (512, 128, 1024, 1, True, True, 5, 3))),
    "B1": ((3, 24, 32), _stages(
        (32, 32, 64, 1, False, False, 3, 3), (64, 48, 256, 1, True, False, 3, 3),
        (256, 96, 512, 2, True, True, 5, 3), (512, 192, 1024, 1, True, True, 5, 3))),
    "B2": ((3, 24, 32), _stages(
        (32, 32, 96, 1, False, False, 3, 4), (96, 64, 384, 1, True, False, 3, 4),
        (384, 128, 768, 3, True, True, 5, 4), (768, 256, 1536, 1, True, True, 5, 4))),
    "B3": ((3, 24, 32), _stages(
        (32, 32, 128, 1, False, False, 3, 5), (128, 64, 512, 1, True, False, 3, 5),
        (512, 128, 1024, 3, True, True, 5, 5), (1024, 256, 2048, 1, True, True, 5, 5))),
    "B4": ((3, 32, 48), _stages(
        (48, 48, 128, 1, False, False, 3, 6), (128, 96, 512, 1, True, False, 3, 6),
        (512, 192, 1024, 3, True, True, 5, 6), (1024, 384, 2048, 1, True, True, 5, 6))),
    "B5": ((3, 32, 64), _stages(
        (64, 64, 128, 1, False, False, 3, 6), (128, 128, 512, 2, True, False, 3, 6),
        (512, 256, 1024, 5, True, True, 5, 6), (1024, 512, 2048, 2, True, True, 5, 6))),
    "T0": ((3, 8, 16), _stages(
        (16, 16, 32, 1, False, False, 3, 2), (32, 16, 64, 1, True, False, 3, 2),
        (64, 32, 128, 1, True, True, 5, 2), (128, 48, 256, 1, True, True, 5, 2))),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all stored as buffers (official L/X layout)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # ImageNet backbone files come from a trainable BatchNorm and carry this counter.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class LearnableAffineBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias) + BN + optional ReLU; the learnable affine exists only with an activation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: bool = True, use_lab: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act else nn.Identity()
        self.lab = LearnableAffineBlock() if (act and use_lab) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))

    def forward_parts(self, parts: Sequence[torch.Tensor], widths: Sequence[int]) -> torch.Tensor:
        """This block on the channel concat of `parts` (`widths` channels each, plain ints so that an exported
        graph slices its kernel into constants), without building the concat: a convolution of a concat is the
        sum of each part's convolution with its slice of the input channels (groups=1 only)."""
        if self.conv.groups != 1 or sum(widths) != self.conv.in_channels or len(widths) != len(parts):
            raise ValueError(f"forward_parts: {len(parts)} parts of widths {list(widths)} for an ungrouped "
                             f"convolution of {self.conv.in_channels} input channels")
        out, start = None, 0
        for part, width in zip(parts, widths, strict=True):
            # A slice with int bounds (not split) is what the ONNX exporter folds into a constant kernel.
            y = F.conv2d(part, self.conv.weight[:, start:start + width], None, self.conv.stride, self.conv.padding)
            out, start = (y if out is None else out + y), start + width
        return self.lab(self.act(self.bn(out)))


class LightConvBNAct(nn.Module):
    """Pointwise projection without activation, then a depthwise kxk with activation."""

    def __init__(self, cin: int, cout: int, k: int, use_lab: bool):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 1, act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(cout, cout, k, groups=cout, act=True, use_lab=use_lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """Stride-4 stem: 3x3 s2, then a 2x2 conv pair beside a 2x2 max-pool (both right/bottom padded)."""

    def __init__(self, cin: int, mid: int, cout: int, use_lab: bool):
        super().__init__()
        self.stem1 = ConvBNAct(cin, mid, 3, 2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid, mid // 2, 2, 1, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid // 2, mid, 2, 1, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid * 2, mid, 3, 2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid, cout, 1, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)
        self.mid = mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        pooled = self.pool(x)
        if self.training:
            return self.stem4(self.stem3(torch.cat([pooled, branch], dim=1)))
        # Deployed (eval mode, so every export inherits it): the same sum without the concat, which OpenVINO
        # copies on its reference INT8 kernel at stride 2 (~0.3 ms of N's 23 at 640; docs/BENCHMARKS.md,
        # session 13). Training keeps the concat: a different summation order trains to different weights.
        return self.stem4(self.stem3.forward_parts([pooled, branch], (self.mid, self.mid)))


class HGBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, n_layers: int, k: int, residual: bool,
                 light: bool, use_lab: bool):
        super().__init__()
        self.residual = residual
        layers = []
        for i in range(n_layers):
            c = cin if i == 0 else mid
            layers.append(LightConvBNAct(c, mid, k, use_lab) if light else ConvBNAct(c, mid, k, use_lab=use_lab))
        self.layers = nn.ModuleList(layers)
        total = cin + n_layers * mid
        # Squeeze-excitation style aggregation: concat -> out/2 -> out.
        self.aggregation = nn.Sequential(
            ConvBNAct(total, cout // 2, 1, use_lab=use_lab),
            ConvBNAct(cout // 2, cout, 1, use_lab=use_lab),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            feats.append(y)
        y = self.aggregation(torch.cat(feats, dim=1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, spec: StageSpec, use_lab: bool):
        super().__init__()
        if spec.downsample:
            self.downsample: nn.Module = ConvBNAct(spec.in_ch, spec.in_ch, 3, 2, groups=spec.in_ch, act=False,
                                                   use_lab=use_lab)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            HGBlock(spec.in_ch if i == 0 else spec.out_ch, spec.mid_ch, spec.out_ch, spec.layers, spec.kernel,
                    residual=i > 0, light=spec.light, use_lab=use_lab)
            for i in range(spec.blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def _freeze_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d(module.num_features, module.eps)
    for name, child in module.named_children():
        new = _freeze_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


class HGNetv2(nn.Module):
    """Returns the outputs of the stages in `return_idx` (strides 4, 8, 16, 32 for stages 0..3)."""

    strides = (4, 8, 16, 32)

    def __init__(self, name: str, use_lab: bool = False, return_idx: tuple[int, ...] = (1, 2, 3),
                 freeze_stem: bool = False, freeze_norm: bool = False):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown HGNetv2 variant {name!r}; choose one of {sorted(ARCHS)}")
        stem, stages = ARCHS[name]
        self.name = name
        self.return_idx = tuple(return_idx)
        self.out_channels = [s.out_ch for s in stages]
        self.stem = StemBlock(*stem, use_lab=use_lab)
        self.stages = nn.ModuleList(HGStage(s, use_lab) for s in stages)
        if freeze_stem:
            for p in self.stem.parameters():
                p.requires_grad_(False)
        if freeze_norm:
            _freeze_bn(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
            if i >= max(self.return_idx):
                break
        return outs
