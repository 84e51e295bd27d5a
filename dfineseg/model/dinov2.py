"""A DINOv2 ViT backbone (seed 003) with LoRA adapters and a simple feature pyramid, in our code.

The ViT follows the DINOv2 architecture (pre-norm blocks with LayerScale, a class token, optional register
tokens, learned position embeddings for a 518 px / 14 px-patch grid of 37x37, interpolated to the input) and
its state-dict keys equal the official torch-hub checkpoints (`dinov2_vits14_pretrain.pth`,
`dinov2_vitb14_pretrain.pth`: `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `blocks.0.ls1.gamma`,
`pos_embed` of 1 + 37*37 tokens, ...), so a downloaded file loads key for key (`load_dinov2_weights`).

Inputs stay multiples of 32 (the mask head's and the export's contract): the backbone pads them at the
bottom and right to a multiple of 14, and maps its single stride-14 token grid to the strides 8, 16 and 32
the HybridEncoder expects, ViTDet style: the tokens of three evenly spaced blocks are resampled to each
stride and projected by a 1x1 convolution + BatchNorm to the widths of the HGNetv2 stage they replace.

LoRA (`lora_rank` > 0): each targeted linear layer (`qkv`, `proj`) gets a low-rank update
W x + (alpha / r) * B A x with A random and B zero (the start equals the base model); `merge_lora` folds
it into W for deployment, so exported graphs hold no LoRA operations. Freezing the base weights is the
trainer's decision (only with pretrained weights: freezing random weights is pointless).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
PRETRAIN_GRID = 37  # 518 / 14: the grid of the official position embeddings

# name -> (embed dim, depth, heads). `dinov2_t` is a narrow test variant (not an official model).
VARIANTS: dict[str, tuple[int, int, int]] = {
    "dinov2_s": (384, 12, 6),
    "dinov2_b": (768, 12, 12),
    "dinov2_t": (64, 3, 2),
}
LORA_TARGETS = ("qkv", "proj")


class LoRALinear(nn.Module):
    """The low-rank update of one linear layer: (alpha / rank) * B(A(x)); B starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / self.rank
        self.a = nn.Linear(in_features, self.rank, bias=False)
        self.b = nn.Linear(self.rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.b.weight @ self.a.weight) * self.scale


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, lora_rank: int = 0, lora_targets: tuple[str, ...] = LORA_TARGETS):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # LoRA lives beside the layer it adapts, so the base keys stay the official ones.
        self.lora = nn.ModuleDict({
            name: LoRALinear(dim, getattr(self, name).out_features, lora_rank)
            for name in lora_targets if lora_rank > 0
        })

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, name)(x)
        return y + self.lora[name](x) if name in self.lora else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self._linear("qkv", x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Written out (not scaled_dot_product_attention) so every exporter sees plain MatMul/Softmax.
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self._linear("proj", x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, lora_rank: int = 0, lora_targets: tuple[str, ...] = LORA_TARGETS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, lora_rank, lora_targets)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DinoV2ViT(nn.Module):
    """The DINOv2 ViT/14: images [B,3,H,W] (multiples of 14) -> the patch tokens of the blocks in `taps`,
    each [B, D, H/14, W/14]."""

    def __init__(self, variant: str, num_register_tokens: int = 0, lora_rank: int = 0,
                 lora_targets: tuple[str, ...] = LORA_TARGETS) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {variant!r}; choose one of {sorted(VARIANTS)}")
        dim, depth, heads = VARIANTS[variant]
        self.embed_dim, self.depth = dim, depth
        self.num_register_tokens = int(num_register_tokens)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID * PRETRAIN_GRID, dim))
        if self.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, self.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # official key (masked-image pretraining); unused here
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, lora_rank, lora_targets) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        # Three evenly spaced blocks feed strides 8, 16, 32 (the last block for stride 32).
        self.taps = (depth // 3 - 1, 2 * depth // 3 - 1, depth - 1) if depth >= 3 else (depth - 1,) * 3

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """[1, 1 + gh*gw, D]: the pretraining grid's embeddings resampled (bicubic) to a gh x gw grid."""
        if gh == PRETRAIN_GRID and gw == PRETRAIN_GRID:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, PRETRAIN_GRID, PRETRAIN_GRID, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = images.shape
        gh, gw = h // PATCH, w // PATCH
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, gh*gw, D]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.position_embedding(gh, gw)
        if self.num_register_tokens:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        skip = 1 + self.num_register_tokens
        feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                tokens = self.norm(x) if i == self.depth - 1 else x
                feats[i] = tokens[:, skip:].transpose(1, 2).reshape(b, -1, gh, gw)
        return [feats[t] for t in self.taps]


class DinoV2Backbone(nn.Module):
    """The ViT plus the simple feature pyramid, with HGNetv2's interface: `return_idx` stages (1, 2, 3 =
    strides 8, 16, 32) and `out_channels` per stage index, so DFINESeg swaps one for the other."""

    def __init__(self, variant: str, out_channels: list[int], return_idx: tuple[int, ...] = (1, 2, 3),
                 lora_rank: int = 0, lora_targets: tuple[str, ...] = LORA_TARGETS,
                 num_register_tokens: int = 0) -> None:
        super().__init__()
        if not set(return_idx) <= {1, 2, 3}:
            raise ValueError(f"the DINOv2 backbone gives stages 1..3 (strides 8, 16, 32), asked {return_idx}")
        self.vit = DinoV2ViT(variant, num_register_tokens, lora_rank, lora_targets)
        self.return_idx = tuple(return_idx)
        self.out_channels = list(out_channels)
        dim = self.vit.embed_dim
        self.lateral = nn.ModuleDict({
            str(i): nn.Sequential(nn.Conv2d(dim, out_channels[i], 1, bias=False), nn.BatchNorm2d(out_channels[i]))
            for i in self.return_idx
        })

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        ph, pw = -h % PATCH, -w % PATCH
        if ph or pw:  # bottom/right zero padding to the patch grid; features are resampled to H/s x W/s below
            images = F.pad(images, (0, pw, 0, ph))
        taps = self.vit(images)
        outs = []
        for i in self.return_idx:
            stride = 2 ** (i + 2)
            x = F.interpolate(taps[i - 1], size=(h // stride, w // stride), mode="bilinear", align_corners=False)
            outs.append(self.lateral[str(i)](x))
        return outs


# ---------------------------------------------------------------- LoRA merge and weights
@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA update into its base layer and remove the adapters; returns how many were merged."""
    merged = 0
    for attn in [m for m in module.modules() if isinstance(m, Attention)]:
        for name, lora in list(attn.lora.items()):
            base: nn.Linear = getattr(attn, name)
            base.weight += lora.delta_weight().to(base.weight.dtype)
            merged += 1
        attn.lora = nn.ModuleDict()
    return merged


class DinoV2WeightsError(ValueError):
    pass


def load_dinov2_weights(vit: DinoV2ViT, path: str | Path) -> int:
    """Load an official DINOv2 hub checkpoint into `vit` key for key (LoRA adapters keep their start);
    refuses a file whose keys or shapes differ, naming the first mismatch. Returns the tensors loaded."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise DinoV2WeightsError(f"{path}: not a DINOv2 state dict")
    own = {k: v for k, v in vit.state_dict().items() if ".lora." not in k}
    for key in sorted(set(own) | set(state)):
        if key not in state:
            raise DinoV2WeightsError(f"{path}: lacks '{key}' (is it a DINOv2 {_variant_name(vit)} checkpoint?)")
        if key not in own:
            raise DinoV2WeightsError(f"{path}: has '{key}', which this DINOv2 {_variant_name(vit)} does not "
                                     "(a model with register tokens, or another architecture?)")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise DinoV2WeightsError(f"{path}: '{key}' has shape {tuple(state[key].shape)}, this model "
                                     f"{tuple(own[key].shape)} (another DINOv2 size?)")
    vit.load_state_dict(state, strict=False)
    return len(own)


def _variant_name(vit: DinoV2ViT) -> str:
    return {v[0]: k for k, v in VARIANTS.items()}.get(vit.embed_dim, f"dim {vit.embed_dim}")
