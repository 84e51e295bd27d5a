"""Where images come from (sources) and where results go (sinks), for `dfineseg infer`.

Sources: an image file, a folder, a glob pattern, a video file or a webcam index. Each yields `Frame`s
(a name, the RGB uint8 image, an image id) and keeps a list of skipped unreadable images, which the CLI
reports: a folder with one broken file still runs, and says which file it skipped and why.

Sinks (`ResultWriter`): annotated images, an annotated video written frame by frame, predictions JSON
(COCO results with RLE masks and the dataset's category ids; image ids follow the sorted file names
from 1, as `dfineseg val` numbers a YOLO split, with `images.json` mapping id -> file), YOLO-seg txt
files and optional box crops.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dfineseg.infer.backends import PredictorError
from dfineseg.infer.detections import Detections
from dfineseg.infer.image_io import IMAGE_SUFFIXES as DATASET_IMAGE_SUFFIXES
from dfineseg.infer.image_io import (  # the one image reader (also used for training)
    ImageReadError,
    read_image,
)
from dfineseg.infer.preprocess import to_rgb_uint8

# Sources accept a few more suffixes than datasets (netpbm, JPEG 2000): OpenCV decodes them all.
IMAGE_SUFFIXES = tuple(dict.fromkeys(DATASET_IMAGE_SUFFIXES + (".jp2", ".pbm", ".pgm", ".ppm", ".pnm")))
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".gif")
_GLOB_CHARS = set("*?[")


class SourceError(PredictorError):
    """A source that cannot be opened (missing path, unreadable image or video, no camera)."""


@dataclass
class Frame:
    """One image to run: `name` is the output file name (relative), `image_id` its COCO id (from 1)."""

    name: str
    image: np.ndarray
    image_id: int
    path: Path | None = None
    frame_index: int | None = None  # video frames only


@dataclass
class Source:
    """Base: iterate for `Frame`s; `total` (None when unknown), `skipped` [(file, reason)] after iterating."""

    kind: str
    description: str
    total: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_video(self) -> bool:
        return self.kind in ("video", "webcam", "stream")

    def input_paths(self) -> list[Path]:
        """The files or folders this source reads: outputs must never be written over them."""
        return []


@dataclass
class ImageFilesSource(Source):
    files: list[Path] = field(default_factory=list)
    root: Path | None = None

    def __post_init__(self) -> None:
        self.total = len(self.files)

    def input_paths(self) -> list[Path]:
        # A folder protects all of it; a glob only the files it matched (its common folder may be `.`).
        if self.kind == "folder" and self.root is not None:
            return [self.root]
        return list(self.files)

    def _name(self, path: Path) -> str:
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.name

    def __iter__(self) -> Iterator[Frame]:
        self.skipped = []
        for image_id, path in enumerate(self.files, 1):
            try:
                image = read_image(path)
            except ImageReadError as exc:
                if self.kind == "image":  # the one image asked for: nothing to fall back on
                    raise
                self.skipped.append((str(path), str(exc).removeprefix(f"{path}: ")))
                continue
            yield Frame(self._name(path), image, image_id, path=path)


@dataclass
class VideoSource(Source):
    target: str | int = 0
    fps: float = 30.0
    size: tuple[int, int] = (0, 0)  # (W, H)
    max_frames: int | None = None

    def _open(self) -> Any:
        cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            what = f"webcam {self.target}" if self.kind == "webcam" else f"video {self.target}"
            raise SourceError(f"cannot open {what} (missing codec, unreadable file or no such camera)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else 30.0
        self.size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.total = count if count > 0 and self.kind == "video" else self.max_frames
        if self.max_frames is not None and self.total is not None:
            self.total = min(self.total, self.max_frames)
        return cap

    def input_paths(self) -> list[Path]:
        return [Path(self.target)] if self.kind == "video" and Path(str(self.target)).exists() else []

    def probe(self) -> VideoSource:
        """Open once to read fps, size and frame count (raises SourceError now rather than mid-run)."""
        self._open().release()
        return self

    def __iter__(self) -> Iterator[Frame]:
        cap = self._open()
        stem = _video_stem(self)
        try:
            index = 0
            while self.max_frames is None or index < self.max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                index += 1
                yield Frame(f"{stem}_{index:06d}", to_rgb_uint8(bgr, assume_bgr=True), index, frame_index=index)
        finally:
            cap.release()


def _sorted_files(paths: Sequence[Path]) -> list[Path]:
    return sorted((p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.as_posix())


def open_source(spec: str | int | Path, max_frames: int | None = None, reconnect: int = 3,
                realtime: bool = False) -> Source:
    """`img.jpg`, `folder/`, `'images/*.png'`, `clip.mp4`, `rtsp://...`, `0` (webcam index) -> a Source.
    `reconnect` and `realtime` apply to network streams (infer/stream.py)."""
    if str(spec).strip().isdigit() and not Path(str(spec).strip()).exists():
        return VideoSource("webcam", f"webcam {int(spec)}", target=int(spec), max_frames=max_frames).probe()
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise SourceError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return ImageFilesSource("folder", str(path), files=files, root=path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            return VideoSource("video", str(path), target=str(path), max_frames=max_frames).probe()
        return ImageFilesSource("image", str(path), files=[path], root=path.parent)
    if "://" in text:  # rtsp://, http:// streams: OpenCV's FFmpeg backend opens them like a file
        from dfineseg.infer.stream import open_stream

        return open_stream(text, max_frames=max_frames, reconnect=reconnect, realtime=realtime)
    if _GLOB_CHARS & set(text):
        matches = [Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True)]
        files = _sorted_files(matches)
        if not files:
            raise SourceError(f"glob '{text}' matches no image files")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return ImageFilesSource("glob", text, files=files, root=root)
    raise SourceError(f"source not found: {text} (give an image, a folder, a glob like 'dir/*.jpg', a video or a webcam index)")


# ----------------------------------------------------------------------------------------------- sinks
@dataclass
class SinkOptions:
    save_images: bool = True
    save_json: bool = True
    save_txt: bool = False
    save_crops: bool = False
    mask_alpha: float = 0.45
    line_width: int | None = None
    show_conf: bool = True
    track: bool = False  # track ids in every sink, plus tracks.json and mot.txt


def planned_outputs(source: Source, options: SinkOptions) -> list[str]:
    """The files (relative to `out`) a run over `source` writes, except crops (their names depend on the
    detections) and summary.json: checked with `OutputFolder.check_all` before the first image is read."""
    rels: list[str] = []
    if isinstance(source, ImageFilesSource):
        names = [source._name(p) for p in source.files]
        if options.save_images:
            rels += [f"images/{_image_name(n)}" for n in names]
        if options.save_txt:
            rels += [Path("labels", n).with_suffix(".txt").as_posix() for n in names]
    elif isinstance(source, VideoSource) and options.save_images:
        rels.append(f"{_video_stem(source)}.mp4")
    if options.save_json:
        rels += ["predictions.json", "images.json"]
    if options.track:
        rels += ["tracks.json", "mot.txt"]
    return rels


class ResultWriter:
    """Writes every sink for one run into `out` (created). `close()` writes the JSON files and returns
    a summary of what was written.

    `out` is a folder path or a `dfineseg.utils.outputs.OutputFolder` (the CLI's, which protects the source
    and the model file): every file goes through its `claim`, so a run never writes over a file dfineseg
    did not write (a source image, a ground-truth label) or over one of its inputs.
    """

    def __init__(
        self,
        out: Any,
        names: Sequence[str],
        category_ids: Sequence[int] | None,
        options: SinkOptions | None = None,
        video_fps: float | None = None,
    ) -> None:
        if hasattr(out, "claim"):
            self.folder = out
        else:
            # Imported here: the one torch-free helper of the core package that every command's outputs share.
            from dfineseg.utils.outputs import OutputFolder

            self.folder = OutputFolder(out, command="infer")
        self.out = Path(self.folder.root)
        self.names = list(names)
        self.category_ids = list(category_ids) if category_ids is not None else list(range(len(names)))
        self.options = options or SinkOptions()
        self.video_fps = video_fps
        self.results: list[dict] = []
        self.images: dict[str, str] = {}
        self.counts = {"images": 0, "detections": 0, "empty": 0}
        self._video: Any = None
        self._video_path: Path | None = None
        self.files: list[Path] = []
        self.tracks: list[dict] = []  # one record per tracked detection per frame (options.track)

    # -------------------------------------------------------------- per frame
    def write(self, frame: Frame, det: Detections, track_ids: np.ndarray | None = None) -> None:
        """Every sink for one frame; `track_ids` (one per detection) when tracking."""
        from dfineseg.infer.draw import draw_detections

        if self.options.track and (track_ids is None or len(track_ids) != len(det)):
            raise ValueError("a tracking run writes one track id per detection")
        if track_ids is not None:
            self._note_tracks(frame, det, track_ids)
        self.counts["images"] += 1
        self.counts["detections"] += len(det)
        self.counts["empty"] += int(len(det) == 0)
        opts = self.options
        if opts.save_json:
            self.results.extend(det.to_coco(frame.image_id, self.category_ids, with_masks=det.has_masks))
            self.images[str(frame.image_id)] = str(frame.path) if frame.path is not None else frame.name
        if opts.save_images:
            drawn = draw_detections(
                frame.image, det, self.names, mask_alpha=opts.mask_alpha, line_width=opts.line_width,
                show_conf=opts.show_conf, track_ids=track_ids,
            )
            if self.video_fps is not None:
                self._write_video_frame(drawn, frame)
            else:
                self._write_image(f"images/{_image_name(frame.name)}", drawn)
        if opts.save_txt:
            txt = self.folder.claim(Path("labels", frame.name).with_suffix(".txt"))
            lines = det.to_yolo_lines(with_conf=False)
            if track_ids is not None:  # the track id as the last column, as Ultralytics writes it
                lines = [f"{line} {int(t)}" for line, t in zip(lines, track_ids, strict=True)]
            try:
                txt.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            except OSError as exc:
                raise self.folder.os_error(exc, txt) from None
        if opts.save_crops and len(det):
            self._write_crops(frame, det)

    def _note_tracks(self, frame: Frame, det: Detections, track_ids: np.ndarray) -> None:
        # Frames count from 1, as video frame numbers and the MOT challenge do.
        index = frame.frame_index if frame.frame_index is not None else frame.image_id
        for box, score, label, tid in zip(det.boxes, det.scores, det.labels, track_ids, strict=True):
            self.tracks.append({
                "frame": int(index), "image_id": int(frame.image_id), "track_id": int(tid),
                "box": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                "class": int(label), "name": self.names[int(label)] if int(label) < len(self.names) else str(int(label)),
            })

    def _write_image(self, rel: str, rgb: np.ndarray) -> None:
        path = self.folder.claim(rel)
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise PredictorError(f"{path}: OpenCV could not write this image (disk full or unsupported suffix?)")

    def _write_video_frame(self, rgb: np.ndarray, frame: Frame) -> None:
        if self._video is None:
            stem = frame.name.rsplit("_", 1)[0]
            self._video_path = self.folder.claim(f"{stem}.mp4")
            h, w = rgb.shape[:2]
            self._video = cv2.VideoWriter(str(self._video_path), cv2.VideoWriter_fourcc(*"mp4v"), self.video_fps, (w, h))
            if not self._video.isOpened():
                raise PredictorError(f"{self._video_path}: OpenCV cannot open a video writer (mp4v codec unavailable?)")
            self.files.append(self._video_path)
        self._video.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def _write_crops(self, frame: Frame, det: Detections) -> None:
        h0, w0 = frame.image.shape[:2]
        stem = Path(frame.name).with_suffix("").as_posix().replace("/", "_")
        for i, (box, label) in enumerate(zip(det.boxes, det.labels)):
            x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
            x1, y1 = min(int(np.ceil(box[2])), w0), min(int(np.ceil(box[3])), h0)
            if x1 <= x0 or y1 <= y0:
                continue
            cls = self.names[int(label)] if int(label) < len(self.names) else str(int(label))
            self._write_image(f"crops/{_safe(cls)}/{stem}_{i}.jpg", frame.image[y0:y1, x0:x1])

    # -------------------------------------------------------------- end of run
    def close(self) -> dict[str, Any]:
        if self._video is not None:
            self._video.release()
            self._video = None
        if self.options.save_json:
            self._write_json("predictions.json", self.results)
            self._write_json("images.json", self.images)
        summary = {"out": str(self.out), **self.counts, "video": str(self._video_path) if self._video_path else None}
        if self.options.track:
            self._write_json("tracks.json", self.tracks)
            self.files.append(self.folder.write_text("mot.txt", mot_challenge_text(self.tracks)))
            summary["tracks"] = len({r["track_id"] for r in self.tracks})
        return summary

    def _write_json(self, rel: str, data: Any) -> None:
        self.files.append(self.folder.write_text(rel, json.dumps(data)))


def mot_challenge_text(records: Sequence[dict]) -> str:
    """MOT-challenge lines `frame,id,left,top,width,height,score,-1,-1,-1` (frames from 1), frame order."""
    lines = []
    for r in sorted(records, key=lambda r: (r["frame"], r["track_id"])):
        x1, y1, x2, y2 = r["box"]
        lines.append(f"{r['frame']},{r['track_id']},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{r['score']:.4f},-1,-1,-1")
    return "".join(line + "\n" for line in lines)


def _video_stem(source: VideoSource) -> str:
    """The annotated video's name: the frames are named `<stem>_<index>` (see VideoSource.__iter__)."""
    if source.kind == "stream":
        from dfineseg.infer.stream import _stream_stem

        return _stream_stem(str(source.target))
    return Path(str(source.target)).stem if source.kind == "video" else f"webcam{source.target}"


def _image_name(name: str) -> str:
    """Keep the source's relative name; formats OpenCV cannot write become .png."""
    p = Path(name)
    writable = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
    return p.as_posix() if p.suffix.lower() in writable else p.with_suffix(".png").as_posix()


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "class"
