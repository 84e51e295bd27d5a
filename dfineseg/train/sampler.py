"""The training batches: which items (a seeded permutation per epoch, split across ranks, resumable
mid-epoch) and at which input size (the multi-scale rule, data.augment.multiscale).

The order depends only on (seed, epoch), never on the global RNG, so a run resumed from a checkpoint
taken after batch k of epoch e continues with batch k+1 of the very same permutation. It does the job
of torch's DistributedSampler (pad to a multiple of the world size, rank r takes every world-th index)
and yields whole batches so a resume can skip the batches already consumed.

Items are `(index, (H, W))` keys as `SegmentationDataset` takes them. A batch's size comes from
(seed, epoch, batch number) alone (`MultiScaleRule`), so the sizes also survive a resume and agree
across ranks. The epoch reaches the dataset once per epoch through `SegmentationDataset.set_epoch`
(`epoch_loader`), not through the keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class MultiScaleRule:
    """Per-batch input size: with probability `p` a random size between `min_frac` and `max_frac` of
    `imgsz` (multiples of 32, aspect kept), else `imgsz`; always `imgsz` from `off_epoch` on."""

    imgsz: tuple[int, int]
    p: float = 0.0
    min_frac: float = 0.75
    max_frac: float = 1.25
    seed: int = 0
    off_epoch: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> MultiScaleRule:
        """The rule of `cfg.data.augment.multiscale` (seeded by `cfg.train.seed`); p=0 keeps `data.imgsz`."""
        ms = cfg.data.augment.multiscale
        imgsz = cfg.data.imgsz
        hw = (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))
        return cls(hw, p=float(ms.p), min_frac=float(ms.min_frac), max_frac=float(ms.max_frac),
                   seed=int(cfg.train.seed), off_epoch=ms.off_epoch)

    def sizes(self) -> list[tuple[int, int]]:
        """Every size the rule may pick, smallest first."""
        h, w = self.imgsz
        lo = max(32, int(np.ceil(h * self.min_frac / 32)) * 32)
        hi = max(lo, int(np.floor(h * self.max_frac / 32)) * 32)
        return [(hh, max(32, round(hh * w / h / 32) * 32)) for hh in range(lo, hi + 1, 32)]

    def size(self, epoch: int, batch_no: int) -> tuple[int, int]:
        active = self.p > 0 and (self.off_epoch is None or epoch < self.off_epoch)
        if not active:
            return self.imgsz
        rng = np.random.default_rng([self.seed, epoch, batch_no])
        if rng.random() >= self.p:
            return self.imgsz
        options = self.sizes()
        return options[int(rng.integers(len(options)))]


class ResumableBatchSampler(Sampler[list[tuple[int, tuple[int, int] | None]]]):
    """One epoch's batches of `(index, size)` keys from batch `start_batch` on (`set_epoch`)."""

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        scale: MultiScaleRule | None = None,
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
        # None: every key says no size and the dataset uses its own imgsz.
        self.scale = scale

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

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int] | None]]]:
        idx = self.rank_indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            size = self.scale.size(self.epoch, b) if self.scale is not None else None
            yield [(i, size) for i in idx[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch
