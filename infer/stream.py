"""Network streams (`rtsp://`, `http://`, ...) as a source that survives the network.

- **Reconnect**: when a read fails (the camera rebooted, Wi-Fi dropped) the stream is reopened up to
  `reconnect` times, waiting `reconnect_wait` seconds before the first attempt and twice as long before each
  next one; frames keep their running numbers. When every attempt fails the source ends normally and says
  why (`events`), so the run still writes its outputs.
- **Real time** (`realtime=True`): a reader thread keeps only the newest frame; when the model is slower than
  the stream, older frames are dropped (counted in `dropped`) instead of piling up, so results stay current.
  Off by default: every frame is processed, as for a file.
- **Clean stop**: leaving the loop early (max_frames, an exception, Ctrl-C in the caller) stops the reader
  thread and releases the connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from dfineseg.infer.io import Frame, SourceError, VideoSource
from dfineseg.infer.preprocess import to_rgb_uint8


@dataclass
class StreamSource(VideoSource):
    reconnect: int = 3
    reconnect_wait: float = 1.0
    realtime: bool = False
    events: list[str] = field(default_factory=list)  # reconnects and the reason the stream ended
    dropped: int = 0  # frames skipped in real-time mode
    reconnects: int = 0

    def _open_capture(self) -> Any:
        cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _reopen(self, frames_so_far: int) -> Any:
        """A new capture after a failed read, or None when every attempt failed (recorded in events)."""
        wait = self.reconnect_wait
        for attempt in range(1, self.reconnect + 1):
            time.sleep(wait)
            cap = self._open_capture()
            if cap is not None:
                self.reconnects += 1
                self.events.append(f"stream lost after frame {frames_so_far}; reconnected (attempt {attempt})")
                return cap
            wait *= 2
        self.events.append(f"stream lost after frame {frames_so_far}; {self.reconnect} reconnect attempt(s) failed")
        return None

    def _reads(self) -> Iterator[np.ndarray]:
        """BGR frames in order, reconnecting on failure, until the stream ends for good."""
        cap = self._open()
        # A file served over HTTP has a frame count: reading all of it is its end, not a drop (reopening it
        # would replay it). A live stream has none (or the server's guess), so a failed read is a drop.
        length = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        count = since_open = 0
        try:
            while True:
                ok, bgr = cap.read()
                if ok:
                    count += 1
                    since_open += 1
                    yield bgr
                    continue
                cap.release()
                if length > 0 and since_open >= length:
                    cap = None
                    self.events.append(f"stream ended after frame {count} (its length)")
                    return
                cap = self._reopen(count)
                if cap is None:
                    return
                length, since_open = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0
        finally:
            if cap is not None:
                cap.release()

    def __iter__(self) -> Iterator[Frame]:
        stem = _stream_stem(str(self.target))
        frames = self._latest() if self.realtime else self._reads()
        index = 0
        try:
            for bgr in frames:
                if self.max_frames is not None and index >= self.max_frames:
                    break
                index += 1
                yield Frame(f"{stem}_{index:06d}", to_rgb_uint8(bgr, assume_bgr=True), index, frame_index=index)
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()

    def _latest(self) -> Iterator[np.ndarray]:
        """Real-time mode: a reader thread overwrites one slot; the consumer takes the newest frame."""
        slot: list[np.ndarray | None] = [None]
        lock = threading.Condition()
        state = {"done": False, "error": None}
        stop = threading.Event()

        def reader() -> None:
            reads = self._reads()
            try:
                for bgr in reads:
                    with lock:
                        if slot[0] is not None:
                            self.dropped += 1
                        slot[0] = bgr
                        lock.notify()
                    if stop.is_set():
                        break
            except BaseException as exc:  # handed to the consumer below
                state["error"] = exc
            finally:
                reads.close()
                with lock:
                    state["done"] = True
                    lock.notify()

        thread = threading.Thread(target=reader, name="dfineseg-stream-reader", daemon=True)
        thread.start()
        try:
            while True:
                with lock:
                    while slot[0] is None and not state["done"]:
                        lock.wait(timeout=0.5)
                    bgr, slot[0] = slot[0], None
                    finished = state["done"]
                if bgr is not None:
                    yield bgr
                elif finished:
                    if state["error"] is not None:
                        raise state["error"]
                    return
        finally:
            stop.set()
            thread.join(timeout=10)

    def report(self) -> dict[str, Any]:
        return {"reconnects": self.reconnects, "dropped_frames": self.dropped, "events": list(self.events)}


def open_stream(url: str, max_frames: int | None = None, reconnect: int = 3, realtime: bool = False,
                reconnect_wait: float = 1.0) -> StreamSource:
    source = StreamSource("stream", url, target=url, max_frames=max_frames, reconnect=reconnect,
                          realtime=realtime, reconnect_wait=reconnect_wait)
    try:
        return source.probe()
    except SourceError as exc:
        raise SourceError(f"{exc}; check the URL and that the stream is up") from None


def _stream_stem(url: str) -> str:
    tail = url.split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1] or "stream"
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "stream"
