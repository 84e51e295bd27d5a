"""HybridEncoder: AIFI (one transformer layer on the deepest level) + FPN/PAN with RepNCSPELAN4 and SCDown.

Attribute names follow the official D-FINE layout (`input_proj`, `encoder`, `lateral_convs`, `fpn_blocks`,
`downsample_convs`, `pan_blocks`, convs as `.conv` + `.norm`) so checkpoints load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNorm(nn.Module):
    """Conv (no bias) + BatchNorm + optional activation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.SiLU() if act == "silu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _fold_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv computing conv + BatchNorm with the running statistics (eval mode)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), bias


class RepVGGBlock(nn.Module):
    """3x3 and 1x1 conv-BN branches summed, then SiLU.

    In eval mode both branches are one 3x3 conv (the 1x1 kernel padded to the 3x3 centre, the BatchNorms
    folded in): the same function, one convolution instead of two plus an add, and the exported graphs
    inherit it because export traces eval mode (the official D-FINE re-parameterises at export too). The
    fused kernel is computed from the parameters on every call, so training, checkpoints and the official
    key layout are unchanged; in an exported graph it is a constant.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvNorm(cin, cout, 3)
        self.conv2 = ConvNorm(cin, cout, 1)
        self.act = nn.SiLU()
        centre = torch.zeros(1, 1, 3, 3)
        centre[..., 1, 1] = 1.0
        self.register_buffer("centre", centre, persistent=False)  # not a checkpoint key

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        w3, b3 = _fold_norm(self.conv1.conv, self.conv1.norm)
        w1, b1 = _fold_norm(self.conv2.conv, self.conv2.norm)
        # The 1x1 kernel at the 3x3 centre, by broadcasting against a one-hot 3x3 buffer (not F.pad: the ONNX
        # exporter cannot infer a padded kernel's shape and refuses the convolution; a buffer, unlike a
        # tensor built here, is folded into a constant kernel even with export.simplify=false).
        return w3 + w1 * self.centre, b3 + b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.act(self.conv1(x) + self.conv2(x))
        weight, bias = self.fused_kernel()
        return self.act(F.conv2d(x, weight, bias, padding=1))


class CSPLayer(nn.Module):
    """Two 1x1 branches, one through `n` RepVGG blocks, summed (expansion 1: no output projection)."""

    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        self.conv1 = ConvNorm(cin, cout, 1, act="silu")
        self.conv2 = ConvNorm(cin, cout, 1, act="silu")
        self.bottlenecks = nn.Sequential(*[RepVGGBlock(cout, cout) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class RepNCSPELAN4(nn.Module):
    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int):
        super().__init__()
        self.split = c3 // 2
        self.cv1 = ConvNorm(c1, c3, 1, act="silu")
        self.cv2 = nn.Sequential(CSPLayer(c3 // 2, c4, n), ConvNorm(c4, c4, 3, act="silu"))
        self.cv3 = nn.Sequential(CSPLayer(c4, c4, n), ConvNorm(c4, c4, 3, act="silu"))
        self.cv4 = ConvNorm(c3 + 2 * c4, c2, 1, act="silu")

    def forward(self, x: torch.Tensor, fine: torch.Tensor | None = None) -> torch.Tensor:
        """The block on `x`; or, given `fine`, on `cat([nearest 2x upsample of x, fine])` (the FPN's top-down step).

        In eval mode the second form runs cv1's half for the upsampled map before the upsample: a 1x1
        convolution commutes with nearest-neighbour upsampling (each upsampled pixel is a copy), so half of
        cv1's multiply-adds run at a quarter of the pixels and its output is upsampled instead. Same function
        up to summation order; at S and 640 px the stride-8 block's cv1 is the encoder's largest convolution
        (1.7 GMAC). Training keeps the concatenation, like the other deployment rewrites, so trained weights
        never depend on it.
        """
        if fine is None:
            return self._after_cv1(self.cv1(x))
        if self.training:
            return self._after_cv1(self.cv1(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), fine],
                                                      dim=1)))
        weight, bias = _fold_norm(self.cv1.conv, self.cv1.norm)
        # The two inputs are equally wide (the hidden width); a plain int, not x.shape[1], so that an exported
        # graph slices the kernel into constants (a wrong width still fails in the convolution).
        c = self.cv1.conv.in_channels // 2
        top = F.interpolate(F.conv2d(x, weight[:, :c]), scale_factor=2.0, mode="nearest")
        return self._after_cv1(self.cv1.act(top + F.conv2d(fine, weight[:, c:], bias)))

    def _after_cv1(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y.split((self.split, self.split), dim=1)
        c = self.cv2(b)
        d = self.cv3(c)
        return self.cv4(torch.cat([a, b, c, d], dim=1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling: 1x1 conv, then depthwise 3x3 stride 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1 = ConvNorm(cin, cout, 1)
        self.cv2 = ConvNorm(cout, cout, 3, 2, groups=cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer with GELU FFN; the position embedding is added to queries and keys."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, value=x, need_weights=False)[0])
        return self.norm2(x + self.linear2(self.activation(self.linear1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(dim, heads, ffn) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x


def sincos_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0,
                              device: torch.device | None = None) -> torch.Tensor:
    """2-D sin-cos embedding [1, h*w, dim] for tokens flattened row-major (y, x).

    The official code builds the grid w-major and concatenates (sin, cos) of its first axis then of its
    second; on a square map the first axis lands on the token's row. We therefore put the row index in the
    first half and the column in the second: identical to the official values for square inputs (so
    trained weights see what they were trained with) and consistent for non-square ones, where the
    official ordering scrambles positions.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    ys = torch.arange(h, dtype=torch.float32, device=device)
    xs = torch.arange(w, dtype=torch.float32, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    oy = gy.reshape(-1, 1) * omega[None]
    ox = gx.reshape(-1, 1) * omega[None]
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    def __init__(self, in_channels: list[int], feat_strides: list[int], hidden_dim: int = 256, nhead: int = 8,
                 dim_feedforward: int = 1024, use_encoder_idx: tuple[int, ...] = (2,), num_encoder_layers: int = 1,
                 expansion: float = 1.0, depth_mult: float = 1.0, pe_temperature: float = 10000.0,
                 memory_fusion: str = "none"):
        super().__init__()
        if memory_fusion not in ("none", "dense"):
            raise ValueError(f"memory_fusion must be 'none' or 'dense', got {memory_fusion!r}")
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = tuple(use_encoder_idx)
        self.pe_temperature = pe_temperature
        self.input_proj = nn.ModuleList()
        for c in in_channels:
            proj = nn.Sequential()
            proj.add_module("conv", nn.Conv2d(c, hidden_dim, 1, bias=False))
            proj.add_module("norm", nn.BatchNorm2d(hidden_dim))
            self.input_proj.append(proj)
        self.encoder = nn.ModuleList(
            TransformerEncoder(hidden_dim, nhead, dim_feedforward, num_encoder_layers) for _ in use_encoder_idx
        )
        # Official widths: ELAN branch = round(expansion * hidden // 2), bottlenecks = round(3 * depth_mult).
        c4 = round(expansion * hidden_dim // 2)
        n = round(3 * depth_mult)
        levels = len(in_channels)
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1) for _ in range(levels - 1))
        self.fpn_blocks = nn.ModuleList(
            RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, c4, n) for _ in range(levels - 1))
        self.downsample_convs = nn.ModuleList(
            nn.Sequential(SCDown(hidden_dim, hidden_dim)) for _ in range(levels - 1))
        self.pan_blocks = nn.ModuleList(
            RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, c4, n) for _ in range(levels - 1))
        # Stable-DINO's dense memory fusion (seed 004 section 3), adapted to the hybrid encoder: per level, the
        # backbone feature (input projection), the top-down (FPN) and the bottom-up (PAN) outputs are
        # concatenated and projected back to the hidden width; the decoder reads the fused maps. Registered
        # last and absent when off, so the official keys and their order are unchanged.
        if memory_fusion == "dense":
            self.fusion = nn.ModuleList(ConvNorm(hidden_dim * 3, hidden_dim, 1) for _ in range(levels))

    @torch.no_grad()
    def fusion_pass_through(self) -> None:
        """Start the dense fusion as the plain encoder: each level's fused map = its PAN output (the last third
        of the concatenation), exactly in eval mode. Used when the rest of the encoder and the decoder come from
        weights trained without the fusion (an official D-FINE file): the starting model then computes what
        those weights computed, instead of feeding the pretrained decoder a random projection."""
        if not hasattr(self, "fusion"):
            return
        c = self.hidden_dim
        for block in self.fusion:
            block.conv.weight.zero_()
            block.conv.weight[:, 2 * c:, 0, 0] = torch.eye(c, dtype=block.conv.weight.dtype)
            norm = block.norm
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)  # (x - 0) / sqrt(var + eps) = x

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [p(f) for p, f in zip(self.input_proj, feats, strict=True)]
        from_backbone = list(proj)
        for enc, idx in zip(self.encoder, self.use_encoder_idx, strict=True):
            b, c, h, w = proj[idx].shape
            tokens = proj[idx].flatten(2).transpose(1, 2)
            pos = sincos_position_embedding(h, w, c, self.pe_temperature, tokens.device).to(tokens.dtype)
            proj[idx] = enc(tokens, pos).transpose(1, 2).reshape(b, c, h, w)

        # Top-down: the coarser map goes through its lateral conv (kept as the new coarse output), is
        # upsampled and fused with the next finer level (the block does both: RepNCSPELAN4.forward).
        levels = len(proj)
        inner = [proj[-1]]
        for step, idx in enumerate(range(levels - 1, 0, -1)):
            top = self.lateral_convs[step](inner[0])
            inner[0] = top
            inner.insert(0, self.fpn_blocks[step](top, proj[idx - 1]))

        outs = [inner[0]]
        for step in range(levels - 1):
            down = self.downsample_convs[step](outs[-1])
            outs.append(self.pan_blocks[step](torch.cat([down, inner[step + 1]], dim=1)))
        if hasattr(self, "fusion"):
            outs = [self._fused(level, *parts) for level, parts in enumerate(zip(from_backbone, inner, outs,
                                                                                 strict=True))]
        return outs

    def _fused(self, level: int, backbone: torch.Tensor, fpn: torch.Tensor, pan: torch.Tensor) -> torch.Tensor:
        """One level of the dense fusion: the projection of [backbone | FPN | PAN]."""
        block = self.fusion[level]
        if fpn is not pan or self.training:
            return block(torch.cat([backbone, fpn, pan], dim=1))
        # The finest level's PAN output is its FPN output (the bottom-up path starts from it), so the
        # concatenation holds one map twice. In eval mode (validation, inference, every export) one conv over
        # [backbone | map] with the two weight slices summed computes the same function at two thirds of the
        # multiply-adds of the model's largest fusion conv (S: 1.26 -> 0.84 GMAC at 640). Training keeps the
        # three-part form: the two differ in the last bits, and a run's trained weights should not depend on a
        # deployment rewrite (a fixture trained with it came out FP16-sensitive: docs/BENCHMARKS.md).
        c = self.hidden_dim
        w = block.conv.weight
        weight = torch.cat([w[:, :c], w[:, c:2 * c] + w[:, 2 * c:]], dim=1)
        return block.act(block.norm(F.conv2d(torch.cat([backbone, pan], dim=1), weight)))
