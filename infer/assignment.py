"""Minimum-cost one-to-one assignment in numpy (the edge install has no scipy).

`linear_assignment(cost)` solves the rectangular assignment problem exactly with the shortest augmenting
path form of the Hungarian method (O(n^2 m) for n rows <= m columns): each row is added in turn and joined
to the assignment along the cheapest alternating path, with row and column potentials keeping the reduced
costs non-negative. Trackers and the tracking metrics assign a few dozen boxes per frame, where this is
well under a millisecond.
"""

from __future__ import annotations

import numpy as np


def linear_assignment(cost: np.ndarray, max_cost: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a minimum-cost matching of min(n, m) pairs of the [n, m] `cost`; pairs whose cost
    exceeds `max_cost` are dropped afterwards (the matching itself is over all pairs, as scipy's
    `linear_sum_assignment` followed by a threshold). Non-finite costs are never matched."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {cost.shape}")
    n, m = cost.shape
    if n == 0 or m == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    finite = np.isfinite(cost)
    # A forbidden pair costs more than any full assignment of allowed pairs, so it is used only when a row
    # has no allowed column left; such pairs are removed below.
    big = (np.abs(cost[finite]).max() + 1.0) * (min(n, m) + 1) if finite.any() else 1.0
    work = np.where(finite, cost, big)
    transposed = n > m
    if transposed:
        work = work.T
        n, m = m, n
    rows, cols = _shortest_augmenting_path(work)
    if transposed:
        rows, cols = cols, rows
        order = np.argsort(rows)
        rows, cols = rows[order], cols[order]
    keep = finite[rows, cols]
    if max_cost is not None:
        keep &= cost[rows, cols] <= max_cost
    return rows[keep], cols[keep]


def _shortest_augmenting_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact assignment of every row of an [n, m] cost (n <= m) to a distinct column."""
    n, m = cost.shape
    u = np.zeros(n + 1)  # row potentials (index 0 unused)
    v = np.zeros(m + 1)  # column potentials; column 0 is the virtual start
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row (1-based) holding column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the alternating path back to the start
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.flatnonzero(owner[1:])
    rows = owner[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)
