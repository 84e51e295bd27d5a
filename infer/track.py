"""Multi-object tracking by detection, ByteTrack style, in numpy only (the edge install stays torch- and
scipy-free).

Each frame's detections are associated with the tracks in two stages (Zhang et al. 2022, ByteTrack):
1. confident detections (score >= `high`) against every live track, tracked or recently lost;
2. the remaining low-score detections (`low` <= score < `high`) against the tracks still unmatched that
   were tracked in the previous frame: a partly occluded object keeps its track through a weak detection
   instead of being dropped.
The cost is 1 - IoU between the detection and the track's box predicted by a constant-velocity Kalman
filter (state: centre, aspect ratio, height and their velocities, as SORT/ByteTrack), or 1 - mask IoU
(`use_masks`, the track's last mask moved by the predicted shift) for segmentations, class-aware (a track
keeps its class); the assignment is exact (`infer/assignment.py`). An unmatched confident detection
(score >= `new_track`) starts a tentative track, which gets an id when it is matched in the next frame
(except in the first frame, which starts confirmed tracks); tracks lost for more than `max_lost` frames end.

`Tracker.update(det)` returns one track id per detection (-1: not tracked), in the order of `det`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dfineseg.infer.assignment import linear_assignment
from dfineseg.infer.boxes import box_iou
from dfineseg.infer.metrics import compact_mask_iou


# ---------------------------------------------------------------- motion
class BoxKalman:
    """Constant-velocity Kalman filter over (cx, cy, aspect, h); noise scaled by the box height (SORT)."""

    _POS_STD = 1.0 / 20
    _VEL_STD = 1.0 / 160

    def __init__(self, xyah: np.ndarray) -> None:
        self.x = np.concatenate([xyah, np.zeros(4)]).astype(np.float64)
        h = max(float(xyah[3]), 1.0)
        std = np.array([2 * self._POS_STD * h, 2 * self._POS_STD * h, 1e-2, 2 * self._POS_STD * h,
                        10 * self._VEL_STD * h, 10 * self._VEL_STD * h, 1e-5, 10 * self._VEL_STD * h])
        self.P = np.diag(std**2)

    _F = np.eye(8) + np.eye(8, k=4)
    _H = np.eye(4, 8)

    def predict(self) -> None:
        h = max(float(self.x[3]), 1.0)
        std = np.array([self._POS_STD * h, self._POS_STD * h, 1e-2, self._POS_STD * h,
                        self._VEL_STD * h, self._VEL_STD * h, 1e-5, self._VEL_STD * h])
        self.x = self._F @ self.x
        self.P = self._F @ self.P @ self._F.T + np.diag(std**2)

    def update(self, xyah: np.ndarray) -> None:
        h = max(float(self.x[3]), 1.0)
        r = np.diag(np.array([self._POS_STD * h, self._POS_STD * h, 1e-1, self._POS_STD * h]) ** 2)
        s = self._H @ self.P @ self._H.T + r
        gain = np.linalg.solve(s, self._H @ self.P).T
        self.x = self.x + gain @ (np.asarray(xyah, dtype=np.float64) - self._H @ self.x)
        self.P = (np.eye(8) - gain @ self._H) @ self.P

    def box(self) -> np.ndarray:
        return xyah_to_xyxy(self.x[:4])


def xyxy_to_xyah(b: np.ndarray) -> np.ndarray:
    w, h = b[2] - b[0], b[3] - b[1]
    return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, w / max(h, 1e-6), h], dtype=np.float64)


def xyah_to_xyxy(s: np.ndarray) -> np.ndarray:
    h = max(float(s[3]), 0.0)
    w = max(float(s[2]), 0.0) * h
    return np.array([s[0] - w / 2, s[1] - h / 2, s[0] + w / 2, s[1] + h / 2], dtype=np.float64)


# ---------------------------------------------------------------- tracks
@dataclass
class Track:
    track_id: int  # 0 while tentative
    cls: int
    score: float
    kalman: BoxKalman
    mask: np.ndarray | None = None  # the last matched mask crop and its origin (use_masks)
    mask_xy: tuple[int, int] = (0, 0)
    mask_box: np.ndarray | None = None  # the box the mask was matched with (to shift it by the motion)
    hits: int = 1
    lost: int = 0  # frames since the last match
    history: list[int] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        return self.track_id > 0

    def box(self) -> np.ndarray:
        return self.kalman.box()


class Tracker:
    """ByteTrack-style association over a sequence of `Detections` (see the module docstring)."""

    def __init__(self, high: float = 0.5, low: float = 0.1, new_track: float = 0.6, match_iou: float = 0.2,
                 low_match_iou: float = 0.5, max_lost: int = 30, use_masks: bool = False) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"tracker thresholds need 0 <= low ({low}) <= high ({high}) <= 1")
        self.high, self.low, self.new_track = high, low, new_track
        self.match_iou, self.low_match_iou = match_iou, low_match_iou
        self.max_lost = int(max_lost)
        self.use_masks = use_masks
        self.tracks: list[Track] = []
        self.frame = 0
        self._next_id = 1

    @classmethod
    def from_conf(cls, conf: float, low: float = 0.1, new_track: float | None = None, **options) -> Tracker:
        """Thresholds around a detector's score threshold `conf`: confident from `conf`, new tracks from
        conf + 0.1, weak detections down to `low` (never above `conf`)."""
        new = min(1.0, conf + 0.1) if new_track is None else new_track
        return cls(high=conf, low=min(low, conf), new_track=new, **options)

    # -------------------------------------------------------------- public
    def update(self, det) -> np.ndarray:
        """Track ids (int64, -1 = untracked) for the detections of the next frame, in their order."""
        self.frame += 1
        n = len(det)
        ids = np.full(n, -1, dtype=np.int64)
        boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det.scores, dtype=np.float64).reshape(-1)
        classes = np.asarray(det.labels, dtype=np.int64).reshape(-1)
        masks = det.masks if (self.use_masks and det.has_masks) else None
        for t in self.tracks:
            t.kalman.predict()

        high = np.flatnonzero(scores >= self.high)
        low = np.flatnonzero((scores >= self.low) & (scores < self.high))
        live = [t for t in self.tracks if t.confirmed or t.lost == 0]
        # 1. confident detections against all live tracks (tracked, lost, tentative)
        pairs, free_tracks, free_high = self._associate(live, high, boxes, classes, det, masks, self.match_iou)
        # 2. weak detections against the tracks tracked until the last frame and still unmatched
        recent = [t for t in free_tracks if t.lost == 0 and t.confirmed]
        pairs2, _, _ = self._associate(recent, low, boxes, classes, det, masks, self.low_match_iou)
        matched: set[int] = set()
        for track, d in pairs + pairs2:
            self._match(track, d, boxes, scores, det, masks)
            matched.add(id(track))
            if track.confirmed:
                ids[d] = track.track_id

        survivors = []
        for t in self.tracks:
            if id(t) not in matched:
                t.lost += 1
                if not t.confirmed or t.lost > self.max_lost:
                    continue  # a tentative track unmatched in its second frame, or lost for too long
            survivors.append(t)
        self.tracks = survivors

        for d in free_high:
            if scores[d] < self.new_track:
                continue
            track = Track(0, int(classes[d]), float(scores[d]), BoxKalman(xyxy_to_xyah(boxes[d])))
            self._remember_mask(track, d, boxes, det, masks)
            if self.frame == 1:
                self._confirm(track)
                ids[d] = track.track_id
            track.history.append(self.frame)
            self.tracks.append(track)
        return ids

    def reset(self) -> None:
        self.tracks, self.frame, self._next_id = [], 0, 1

    # -------------------------------------------------------------- parts
    def _associate(self, tracks, dets, boxes, classes, det, masks, min_iou):
        """Exact assignment on 1 - IoU, class-aware; -> ([(track, det index)], unmatched tracks, unmatched dets)."""
        if not tracks or len(dets) == 0:
            return [], list(tracks), list(dets)
        if masks is not None:
            overlap = np.array([[self._mask_overlap(t, d, boxes, det, masks) for d in dets] for t in tracks])
        else:
            overlap = box_iou(np.stack([t.box() for t in tracks]), boxes[np.asarray(dets, dtype=np.int64)])
        cost = 1.0 - overlap
        same_class = np.array([t.cls for t in tracks])[:, None] == classes[dets][None, :]
        cost[~same_class] = np.inf
        rows, cols = linear_assignment(cost, max_cost=1.0 - min_iou)
        pairs = [(tracks[r], int(dets[c])) for r, c in zip(rows, cols, strict=True)]
        used_t, used_d = set(rows.tolist()), set(cols.tolist())
        free_t = [t for i, t in enumerate(tracks) if i not in used_t]
        free_d = [int(d) for i, d in enumerate(dets) if i not in used_d]
        return pairs, free_t, free_d

    def _mask_overlap(self, track: Track, d: int, boxes, det, masks) -> float:
        if track.mask is None or track.mask_box is None:
            return float(box_iou(track.box()[None], boxes[d][None])[0, 0])
        shift = track.box()[:2] - track.mask_box[:2]  # where the predicted box moved the mask
        xy = (int(round(track.mask_xy[0] + shift[0])), int(round(track.mask_xy[1] + shift[1])))
        return float(compact_mask_iou([track.mask], np.asarray([xy]), [masks[d]], det.mask_origins[d:d + 1])[0, 0])

    def _match(self, track: Track, d: int, boxes, scores, det, masks) -> None:
        track.kalman.update(xyxy_to_xyah(boxes[d]))
        track.score = float(scores[d])
        track.hits += 1
        track.lost = 0
        track.history.append(self.frame)
        self._remember_mask(track, d, boxes, det, masks)
        if not track.confirmed:
            self._confirm(track)

    def _remember_mask(self, track: Track, d: int, boxes, det, masks) -> None:
        if masks is not None:
            track.mask = masks[d]
            track.mask_xy = tuple(int(v) for v in det.mask_origins[d])
            track.mask_box = boxes[d].copy()

    def _confirm(self, track: Track) -> None:
        track.track_id = self._next_id
        self._next_id += 1
