"""A bilinear sampler built from gathers, numerically equal to `F.grid_sample(bilinear, zeros, align_corners=False)`.

Some runtimes (TensorRT, see dfine-facts section 8) mis-compute the ONNX GridSample node in deformable
attention. This sampler exports as Floor/GatherElements/Mul/Add only, which every runtime computes
correctly, at the cost of a few more nodes.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

_ORIGINAL_GRID_SAMPLE = F.grid_sample


def gather_grid_sample(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of `value` [N,C,H,W] at `grid` [N,Ho,Wo,2] (x,y in -1..1), zero outside."""
    n, c, h, w = value.shape
    ho, wo = grid.shape[1], grid.shape[2]
    # align_corners=False: -1 and 1 are the outer edges of the border pixels, not their centres.
    x = ((grid[..., 0] + 1) * w - 1) * 0.5
    y = ((grid[..., 1] + 1) * h - 1) * 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    # Pixel indices in integers: computed in float they are rounded as soon as the graph runs in reduced
    # precision (the FP16 ONNX for TensorRT, OpenVINO's bf16 default): h*w > 2048 is not exact in fp16, > 256
    # not in bf16, and a rounded index reads a neighbouring pixel or runs past the map. The corner is first
    # clamped to just outside the map, so a far-off sample cannot overflow the cast; its pixels then stay
    # outside and get zero weight, as they would have unclamped.
    x0i = x0.clamp(-2, w + 1).to(torch.int32)
    y0i = y0.clamp(-2, h + 1).to(torch.int32)
    flat = value.reshape(n, c, h * w)
    out = value.new_zeros((n, c, ho * wo))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi = x0i + dx
            yi = y0i + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            # Out-of-range corners read pixel 0 and are then weighted by zero (zeros padding).
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).to(torch.int64).reshape(n, 1, ho * wo)
            weight = (wx * wy * inside.to(value.dtype)).reshape(n, 1, ho * wo)
            out = out + torch.gather(flat, 2, idx.expand(n, c, ho * wo)) * weight
    return out.reshape(n, c, ho, wo)


def _patched_grid_sample(
    input: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = None,
) -> torch.Tensor:
    if mode == "bilinear" and padding_mode == "zeros" and not align_corners and input.dim() == 4:
        return gather_grid_sample(input, grid)
    # Any other sampling mode is not what deformable attention uses: leave it to the original.
    return _ORIGINAL_GRID_SAMPLE(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


# Places the model's deformable attention may look the sampler up in. The function is patched in
# whichever of them exists, so the decoder needs no export-specific code path.
_HOOKS: tuple[tuple[str, str], ...] = (
    ("dfineseg.model.decoder", "grid_sample"),
    ("dfineseg.model.decoder", "GRID_SAMPLE"),
)


@contextlib.contextmanager
def use_gather_sampler(enabled: bool = True) -> Iterator[None]:
    """Within the block, deformable attention samples with `gather_grid_sample` instead of grid_sample."""
    if not enabled:
        yield
        return
    patched: list[tuple[Any, str, Callable[..., Any]]] = []
    for module_name, attr in _HOOKS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, _patched_grid_sample)
    # The decoder may also call F.grid_sample directly: patch the functional namespace too.
    patched.append((F, "grid_sample", F.grid_sample))
    F.grid_sample = _patched_grid_sample
    try:
        yield
    finally:
        for module, attr, original in reversed(patched):
            setattr(module, attr, original)
