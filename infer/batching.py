"""Images through a graph in batches: preprocess -> pad to the graph's batch -> forward -> trim.

One loop for the Predictor, export's parity checks and INT8 calibration. A graph exported with a fixed
batch B gets exactly B images per forward: a short last batch is filled by repeating its last image (a
real image keeps calibration statistics honest, where zeros would not) and the filler's outputs are cut
off before anyone sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
Forward = Callable[[np.ndarray], dict[str, np.ndarray]]
Prepare = Callable[[list[Any]], tuple[np.ndarray, list[Any]]]  # images -> (batch [N,3,H,W], per-image metas)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter); works on lists and on streams."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pad_batch(batch: np.ndarray, size: int | None) -> np.ndarray:
    """`batch` filled up to `size` rows by repeating its last row (unchanged when size is None or reached)."""
    if size is None or len(batch) >= size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


def forward_fixed(forward: Forward, batch: np.ndarray, fixed_batch: int | None) -> dict[str, np.ndarray]:
    """`forward` over a batch of any length, in slices of the graph's fixed batch, filler rows removed."""
    if fixed_batch is None or fixed_batch == len(batch):
        return forward(batch)
    parts = []
    for start in range(0, len(batch), fixed_batch):
        part = batch[start : start + fixed_batch]
        out = forward(pad_batch(part, fixed_batch))
        parts.append({k: v[: len(part)] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run_images(
    forward: Forward, images: Sequence[Any], prepare: Prepare, step: int, fixed_batch: int | None = None
) -> Iterator[tuple[dict[str, np.ndarray], list[Any]]]:
    """(outputs, metas) per group of `step` images, in order; outputs hold one row per real image."""
    for group in chunks(images, step):
        batch, metas = prepare(list(group))
        yield forward_fixed(forward, batch, fixed_batch), metas


def pipelined(forward: Callable[[np.ndarray], Any], batches: Iterable[tuple[np.ndarray, Any]],
              depth: int = 2) -> Iterator[tuple[Any, Any]]:
    """(batch, context) pairs -> (forward(batch), context) in input order, with up to `depth` forwards
    queued on one worker thread: the caller prepares the next batch and post-processes the previous one
    while the runtime computes (ONNX Runtime and OpenCV release the GIL). Leaving early waits for the
    queued forwards and drops them."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfineseg-forward") as pool:
        pending: deque = deque()
        for batch, ctx in batches:
            pending.append((pool.submit(forward, batch), ctx))
            if len(pending) >= depth:
                future, first = pending.popleft()
                yield future.result(), first
        while pending:
            future, first = pending.popleft()
            yield future.result(), first
