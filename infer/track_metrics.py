"""CLEAR-MOT tracking metrics (Bernardin and Stiefelhagen 2008): MOTA, ID switches, misses, false positives.

Per frame, a ground-truth object keeps the track it was matched to last time while their boxes still
overlap (IoU >= `iou`); the others are matched by an exact assignment on 1 - IoU. A ground-truth object
matched to a different track id than the last time it was matched is an ID switch.
MOTA = 1 - (misses + false positives + ID switches) / ground-truth objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dfineseg.infer.assignment import linear_assignment
from dfineseg.infer.boxes import box_iou

FrameBoxes = tuple[Sequence[int], np.ndarray]  # (ids, [N,4] xyxy boxes) of one frame


def clear_mot(truth: Sequence[FrameBoxes], tracks: Sequence[FrameBoxes], iou: float = 0.5) -> dict[str, float]:
    """MOTA, ID switches, misses, false positives, matches and mean matched IoU over aligned frames."""
    if len(truth) != len(tracks):
        raise ValueError(f"{len(truth)} ground-truth frames but {len(tracks)} tracked frames")
    last: dict[int, int] = {}  # ground-truth id -> track id of its last match
    n_gt = misses = false_pos = switches = matches = 0
    iou_sum = 0.0
    for (gt_ids, gt_boxes), (tr_ids, tr_boxes) in zip(truth, tracks, strict=True):
        gt_ids, tr_ids = [int(i) for i in gt_ids], [int(i) for i in tr_ids]
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        tr_boxes = np.asarray(tr_boxes, dtype=np.float64).reshape(-1, 4)
        overlap = box_iou(gt_boxes, tr_boxes)
        pairs: dict[int, int] = {}  # gt row -> track row
        for g, gid in enumerate(gt_ids):  # keep last frame's correspondences that still hold
            if gid in last and last[gid] in tr_ids:
                t = tr_ids.index(last[gid])
                if overlap[g, t] >= iou and t not in pairs.values():
                    pairs[g] = t
        free_g = [g for g in range(len(gt_ids)) if g not in pairs]
        free_t = [t for t in range(len(tr_ids)) if t not in pairs.values()]
        if free_g and free_t:
            rows, cols = linear_assignment(1.0 - overlap[np.ix_(free_g, free_t)], max_cost=1.0 - iou)
            for r, c in zip(rows, cols, strict=True):
                pairs[free_g[r]] = free_t[c]
        for g, t in pairs.items():
            gid, tid = gt_ids[g], tr_ids[t]
            if gid in last and last[gid] != tid:
                switches += 1
            last[gid] = tid
            iou_sum += overlap[g, t]
        n_gt += len(gt_ids)
        matches += len(pairs)
        misses += len(gt_ids) - len(pairs)
        false_pos += len(tr_ids) - len(pairs)
    mota = 1.0 - (misses + false_pos + switches) / n_gt if n_gt else float("nan")
    return {"mota": mota, "id_switches": switches, "misses": misses, "false_positives": false_pos,
            "matches": matches, "gt_objects": n_gt, "motp_iou": iou_sum / matches if matches else float("nan")}
