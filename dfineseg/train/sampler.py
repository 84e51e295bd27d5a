"""The training data order: a seeded permutation per epoch, split across ranks, resumable mid-epoch.

The order depends only on (seed, epoch), never on the global RNG, so a run resumed from a checkpoint
taken after batch k of epoch e continues with batch k+1 of the very same permutation. It does the job
of torch's DistributedSampler (pad to a multiple of the world size, rank r takes every world-th index)
and yields whole batches so a resume can skip the batches already consumed.

Items are `(index, (H, W), epoch)` keys as `SegmentationDataset` takes them; with `size_for(epoch, batch_no)`
(multi-scale training) each batch gets its size from (seed, epoch, batch number) alone, so the sizes
also survive a resume and agree across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        imgsz: tuple[int, int] | None = None,
        size_for: Callable[[int, int], tuple[int, int]] | None = None,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError("the training split has no images")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self.imgsz = tuple(imgsz) if imgsz is not None else None
        self.size_for = size_for

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        per_rank = -(-self.dataset_len // self.world_size)
        order += order[: per_rank * self.world_size - len(order)]
        return order[self.rank :: self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = -(-self.dataset_len // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int] | None, int]]]:
        idx = self.rank_indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            size = self.size_for(self.epoch, b) if self.size_for is not None else self.imgsz
            yield [(i, size, self.epoch) for i in idx[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch
