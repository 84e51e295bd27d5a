"""Multi-process training launched by torchrun: process group, device choice, small collectives.

`torchrun --nproc_per_node=N -m dfineseg.cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here degrades to a single process (rank 0 of 1) and every collective is a no-op.
gloo on CPU, nccl on CUDA. Rank 0 alone writes checkpoints, plots and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto`: this process's GPU when CUDA is present, else CPU. `cpu`, `cuda`, `cuda:1` as given."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from dfineseg.infer.errors import UserError

            raise UserError(f"train.device={preference} but CUDA is not available here; use device=cpu or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; otherwise a single-process DistInfo."""
    if not launched_by_torchrun():
        return DistInfo(device=resolve_device(device_preference))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` holds on every rank (so all ranks skip a non-finite step together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() == 0.0)


def broadcast_object(obj, src: int = 0):
    """Rank 0's value on every rank (decisions such as `stop now` or the refitted epoch count)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of per-rank scalars (loss terms for the log). Ranks may hold different keys (a rank
    whose steps were all skipped holds none), so the dicts are gathered rather than all-reduced."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    sums: dict[str, list[float]] = {}
    for part in gathered:
        for key, value in part.items():
            sums.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sums.items()}
