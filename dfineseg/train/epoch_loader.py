"""The training data loader: one epoch's batches from the resumable sampler (from any batch on), the
multi-scale size rule for those batches, and a data-loader worker that died turned into one message."""

from __future__ import annotations

from typing import Any

import torch

from dfineseg.infer.errors import UserError


def multiscale_sizer(cfg: Any):
    """Per-batch input size for multi-scale training (data.augment.multiscale), None when it is off."""
    from dfineseg.data.dataset import MultiScaleBatchSampler

    ms = cfg.data.augment.multiscale
    if ms.p <= 0:
        return None
    # The dataset module's size rule (sizes from (seed, epoch, batch number)), applied to our batches.
    rule = MultiScaleBatchSampler([], cfg.train.batch, cfg.data.imgsz, p=ms.p, min_frac=ms.min_frac,
                                  max_frac=ms.max_frac, seed=cfg.train.seed, off_epoch=ms.off_epoch)

    def size_for(epoch: int, batch_no: int) -> tuple[int, int]:
        rule.epoch = epoch
        return rule._size(batch_no)

    return size_for


def epoch_loader(train_set: Any, sampler: Any, *, epoch: int, epoch_batch: int, total_epochs: int, seed: int,
                 device: torch.device, workers: int) -> torch.utils.data.DataLoader:
    """(images, targets) of epoch `epoch` from batch `epoch_batch` on."""
    from dfineseg.data.dataset import collate_fn, worker_options

    sampler.set_epoch(epoch, epoch_batch)
    # Before the workers start (they copy the dataset), so augmentation switch-off epochs apply.
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
