"""Running a PyTorch model to the exported graph's outputs: the one place that does it.

`graph_forward(model, task, topk)` wraps a DFINESeg in `DeployModel` (the module export traces) and
returns `forward(batch) -> {output name: array}` on a preprocessed float32 [B,3,H,W] numpy batch,
exactly the dictionary every exported backend returns (`dfineseg.infer.graph` names it). The PyTorch
backend (and through it validation), the export parity reference and the latency benchmark all call
it, so a change to the graph contract is made here and in export only. It imports only the graph
names from `dfineseg.infer`: the PyTorch backend depends on this module, not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dfineseg.infer.graph import output_names

Forward = Callable[[np.ndarray], dict[str, np.ndarray]]


def module_forward(module: torch.nn.Module, names: Sequence[str], device: Any = "cpu", half: bool = False) -> Forward:
    """`batch -> {name: array}` for any module returning a tuple of tensors in the order of `names`.

    Floating outputs come back as float32 (also from a half-precision module), integer ones unchanged.
    """
    device = torch.device(device)
    names = tuple(names)

    def forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        if half:
            x = x.half()
        with torch.inference_mode():
            outs = module(x)
        return {name: (t.float() if t.is_floating_point() else t).cpu().numpy() for name, t in zip(names, outs)}

    return forward


def deploy_module(model: torch.nn.Module, topk: int, device: Any = "cpu", half: bool = False) -> torch.nn.Module:
    """The exported graph's module (`DeployModel`, eval mode) on `device`, in half precision if asked."""
    from dfineseg.model.dfine import DeployModel

    deploy = DeployModel(model, topk=topk).eval().to(device)
    return deploy.half() if half else deploy


def graph_forward(model: torch.nn.Module, task: str, topk: int, device: Any = "cpu", half: bool = False) -> Forward:
    """The exported graph's outputs for a DFINESeg (the model is switched to eval mode, not copied)."""
    return module_forward(deploy_module(model, topk, device, half), output_names(task), device, half)

