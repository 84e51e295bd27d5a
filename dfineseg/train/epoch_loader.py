"""The training data path: the dataset and batch sampler a run trains on, one epoch's batches from any
batch on, and a data-loader worker that died turned into one message."""

from __future__ import annotations

from typing import Any

import torch

from dfineseg.infer.errors import UserError
from dfineseg.train.sampler import MultiScaleRule, ResumableBatchSampler


def training_data(cfg: Any, index: Any, rank: int = 0, world_size: int = 1) -> tuple[Any, ResumableBatchSampler]:
    """(SegmentationDataset, ResumableBatchSampler) for the training split `index` under `cfg`."""
    from dfineseg.data.dataset import SegmentationDataset

    tcfg = cfg.train
    # Augmentation randomness is drawn per item from (seed, epoch, index) inside the dataset, so it is
    # the same with any number of workers and after a resume.
    dataset = SegmentationDataset(index, cfg.data.imgsz, True, cfg.data.augment, cfg.data.resize,
                                  seed=tcfg.seed, epochs=tcfg.epochs)
    sampler = ResumableBatchSampler(len(dataset), tcfg.batch, seed=tcfg.seed, shuffle=True, rank=rank,
                                    world_size=world_size, scale=MultiScaleRule.from_config(cfg))
    return dataset, sampler


def epoch_loader(train_set: Any, sampler: Any, *, epoch: int, epoch_batch: int, total_epochs: int, seed: int,
                 device: torch.device, workers: int) -> torch.utils.data.DataLoader:
    """(images, targets) of epoch `epoch` from batch `epoch_batch` on."""
    from dfineseg.data.dataset import collate_fn, worker_options

    sampler.set_epoch(epoch, epoch_batch)
    # The one way the epoch reaches the dataset (augmentation seeds, switch-off epochs): set here, before
    # the workers start, as each epoch's loader starts its own workers with a copy of the dataset.
    train_set.set_epoch(epoch, total_epochs)
    # The loader's own generator (seeded per epoch) feeds worker seeds, so it never draws from the
    # global RNG and the data order / augmentation seeds depend only on (seed, epoch).
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        generator=gen,
        # Workers start from a fork server, never by a fork of this process (OpenCV deadlock).
        **worker_options(workers),
    )
    return loader


def batches(loader):
    """Iterate the loader; a worker process that died becomes one message saying what to do."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            text = str(exc)
            if "DataLoader worker" not in text or "exited unexpectedly" not in text:
                raise
            raise UserError(
                f"a data-loader worker process died ({text.splitlines()[0]}). If the output above says a "
                "worker imported your script, put the call to dfineseg.api.train() under "
                "`if __name__ == \"__main__\":`; if it was killed for memory, lower data.workers or train.batch; "
                "data.workers=0 loads the data in the main process"
            ) from exc
        yield batch
