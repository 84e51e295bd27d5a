"""The torch side of the data: `SegmentationDataset`, `collate_fn` and how loader workers start.

Everything up to the final tensors is numpy/OpenCV (`transforms.py`); this module only converts.
Augmentation randomness is drawn from a generator seeded by (seed, epoch, index), so a sample is the
same whichever worker builds it, and runs are reproducible. Which items go into a batch, and at which
size, is the training sampler's (`dfineseg.train.sampler`).
"""

from __future__ import annotations

import logging
import multiprocessing

import cv2
import numpy as np
import torch

from dfineseg.data.index import DatasetError, DatasetIndex
from dfineseg.data.transforms import Sample, TrainAugment, rasterize, resize_to_network, sample_from_record
from dfineseg.infer.boxes import box_convert
from dfineseg.infer.image_io import ImageReadError, read_image

log = logging.getLogger("dfineseg.data")
MAX_REPLACEMENTS = 20


def _hw(imgsz) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return (imgsz, imgsz)
    return (int(imgsz[0]), int(imgsz[1]))


class SegmentationDataset(torch.utils.data.Dataset):
    """(image float32 [3,H,W] RGB 0..1, target dict) per docs/ARCHITECTURE.md section 2.

    A key is an index, or `(index, (H, W))` as the training sampler yields them (a size of None: `imgsz`).
    The epoch is the dataset's own, set by `set_epoch` before each epoch's loader starts its workers (they
    receive a copy); it seeds the augmentations and switches them off on time.
    An image that cannot be read is replaced by another one and counted in `failed` (per process).
    """

    def __init__(self, index: DatasetIndex, imgsz, train: bool, augment_cfg=None, resize_mode: str = "stretch",
                 seed: int = 0, epochs: int | None = None):
        self.index = index
        self.records = index.images
        self.imgsz = _hw(imgsz)
        self.train = train
        self.resize_mode = resize_mode
        self.seed = int(seed)
        self.epoch = 0
        self.epochs = epochs
        self.failed: dict[str, str] = {}
        self.augment = TrainAugment(augment_cfg, load_random=self._load_random) if train else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int, epochs: int | None = None) -> None:
        self.epoch = int(epoch)
        if epochs is not None:
            self.epochs = epochs
        if self.augment is not None:
            self.augment.set_epoch(self.epoch, self.epochs)

    # ------------------------------------------------------------ loading
    def load_sample(self, i: int) -> Sample:
        rec = self.records[i]
        image = read_image(rec.file)
        if image.shape[:2] != (rec.height, rec.width):
            raise ImageReadError(
                rec.file, f"is {image.shape[1]}x{image.shape[0]} but was {rec.width}x{rec.height} when indexed"
            )
        return sample_from_record(rec, image)

    def _note_failure(self, i: int, exc: ImageReadError) -> None:
        path = str(self.records[i].file)
        if path not in self.failed:
            self.failed[path] = exc.reason
            log.warning("skipping unreadable image %s (%s); %d so far", path, exc.reason, len(self.failed))

    def _load_or_replace(self, i: int, rng: np.random.Generator) -> Sample:
        for _ in range(MAX_REPLACEMENTS):
            try:
                return self.load_sample(i)
            except ImageReadError as exc:
                self._note_failure(i, exc)
                i = int(rng.integers(len(self.records)))
        raise DatasetError(
            f"{MAX_REPLACEMENTS} images in a row could not be read (last: {self.records[i].file}); "
            "run `dfineseg data check` on the dataset"
        )

    def _load_random(self, rng: np.random.Generator) -> Sample:
        return self._load_or_replace(int(rng.integers(len(self.records))), rng)

    # ------------------------------------------------------------ items
    def __getitem__(self, key):
        hw = self.imgsz
        if isinstance(key, tuple | list):
            i, size = key
            i = int(i)
            if size is not None:
                hw = _hw(size)
        else:
            i = int(key)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        sample = self._load_or_replace(i, rng)
        orig_size = sample.orig_size
        if self.train:
            sample = self.augment(sample, rng, hw)
        sample = rasterize(resize_to_network(sample, hw, self.resize_mode, min_size=2.0 if self.train else 0.0))
        return to_tensors(sample, orig_size)


# ---------------------------------------------------------------- loader workers
def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers are started: from a fork server (spawn where there is none), never by fork.

    A forked worker inherits the parent's OpenCV thread pool in a broken state: once the parent has run
    an OpenCV call that used the pool (validation drawing or resizing full-size images), any pool call in
    the child, `cv2.setNumThreads(1)` included, waits forever for threads that do not exist there (the run
    hung at the start of epoch 2 at 0% CPU). Starting workers before any OpenCV use cannot be guaranteed
    (a resumed run, a second `train()` in one process, a user's script), so workers come from a process
    that never runs OpenCV: the fork server, a fresh interpreter started once. It preloads this module,
    so each epoch's workers start by a cheap fork instead of a full spawn re-importing torch and cv2.
    Workers receive the dataset by pickling (it holds only the index and plain settings).
    """
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Takes effect when the server starts (first use); '__main__' is left out on purpose: a user script
    # without an `if __name__ == "__main__":` guard would otherwise run inside the server.
    ctx.set_forkserver_preload([__name__])
    return ctx


def init_worker(worker_id: int) -> None:
    """Runs first in every loader worker: one thread each for OpenCV and torch. Each worker is a process
    already; thread pools inside workers only oversubscribe the cores. Safe here because the worker was
    not forked from a process whose pool was running (see `worker_context`)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def worker_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for `num_workers` workers started the safe way."""
    if num_workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": worker_context(), "worker_init_fn": init_worker}


def to_tensors(sample: Sample, orig_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """A rasterised network-size `Sample` -> (image [3,H,W] float 0..1, target dict)."""
    h, w = sample.image.shape[:2]
    # numpy does the uint8 -> float conversion: torch's intra-op threads only add contention in workers
    chw = np.empty((3, h, w), np.float32)
    np.multiply(sample.image.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=chw, casting="unsafe")
    image = torch.from_numpy(chw)
    boxes = box_convert(sample.boxes.astype(np.float32), "xyxy", "cxcywh") / np.array([w, h, w, h], np.float32)
    masks = sample.masks if sample.masks is not None else np.zeros((len(sample), h, w), bool)
    target = {
        "labels": torch.from_numpy(sample.labels.astype(np.int64)),
        "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),
        "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        "has_mask": torch.from_numpy(sample.has_mask),
        "image_id": int(sample.image_id),
        "orig_size": tuple(orig_size or sample.orig_size),
        "resize_meta": sample.meta,
    }
    return image, target


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack images (one size per batch: the training sampler gives every key of a batch the same size) and
    keep targets as a list."""
    images = [b[0] for b in batch]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one batch differ in size {sorted(sizes)}; give every key of a batch the "
                         "same (H, W), as dfineseg.train.sampler.ResumableBatchSampler does")
    return torch.stack(images), [b[1] for b in batch]
