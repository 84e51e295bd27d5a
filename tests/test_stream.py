"""Network streams (infer/stream.py) against a local HTTP server (no RTSP server can be installed here):
a file played to its end, a stream dropped mid-way and reconnected, one that never comes back, real-time
frame dropping, and a clean stop of `dfineseg infer`."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time

import cv2
import numpy as np
import pytest

from dfineseg.infer.io import open_source

FRAMES = 40


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """An MJPEG AVI (frames are independent chunks, so a cut file still plays up to the cut)."""
    folder = tmp_path_factory.mktemp("served")
    writer = cv2.VideoWriter(str(folder / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for i in range(FRAMES):
        frame = np.zeros((64, 96, 3), np.uint8)
        frame[16:48, 2 * i:2 * i + 16] = (0, 0, 255)
        writer.write(frame)
    writer.release()
    return folder


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; the first `cut_requests` requests get only the first `cut_fraction` of the file
    and the connection is closed, as a camera dropping off the network would."""

    cut_requests = 0
    cut_fraction = 0.5
    served = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        cls = type(self)
        cls.served += 1
        if cls.served > cls.cut_requests:
            return super().do_GET()
        data = (self.directory_path() / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "video/x-msvideo")
        self.end_headers()
        self.wfile.write(data[: int(len(data) * cls.cut_fraction)])
        self.close_connection = True

    def directory_path(self):
        from pathlib import Path

        return Path(self.directory)

    def log_message(self, *args):
        pass


def _serve(folder, cut_requests=0):
    handler_cls = type("Handler", (_Handler,), {"cut_requests": cut_requests, "served": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_cls, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/clip.avi", handler_cls


def test_a_served_file_plays_to_its_end_without_reconnecting(clip_dir):
    server, url, _ = _serve(clip_dir)
    try:
        source = open_source(url, reconnect=2)
        frames = list(source)
    finally:
        server.shutdown()
    assert source.kind == "stream" and source.is_video
    assert len(frames) == FRAMES and [f.frame_index for f in frames] == list(range(1, FRAMES + 1))
    assert source.reconnects == 0 and "ended after frame 40" in source.events[-1]


def test_a_dropped_stream_is_reopened_and_frames_keep_counting(clip_dir):
    server, url, handler = _serve(clip_dir, cut_requests=2)  # the probe's request and the first read are cut
    try:
        source = open_source(url, reconnect=2)
        source.reconnect_wait = 0.05
        frames = list(source)
    finally:
        server.shutdown()
    print(source.report())
    assert source.reconnects == 1 and "reconnected (attempt 1)" in source.events[0]
    lost_after = int(source.events[0].split("after frame ")[1].split(";")[0])
    assert 0 < lost_after < FRAMES
    # the stream came back from its start (a file, not a live feed): the frames after it are numbered on
    assert len(frames) == lost_after + FRAMES
    assert [f.frame_index for f in frames] == list(range(1, len(frames) + 1))


def test_a_stream_that_never_comes_back_ends_the_run_with_its_outputs(clip_dir, standin_files, tmp_path):
    from dfineseg.infer_cli import infer, resolve_options

    server, url, handler = _serve(clip_dir, cut_requests=2)
    original = handler.do_GET

    def cut_then_go_away(self):  # after the cut response the server is gone: connections are refused
        original(self)
        if type(self).served >= 2:
            def close():
                server.shutdown()
                server.server_close()

            threading.Thread(target=close, daemon=True).start()

    handler.do_GET = cut_then_go_away
    out = tmp_path / "run"
    opts = resolve_options([f"model={standin_files.onnx}", f"source={url}", f"out={out}", "reconnect=2",
                            "progress=false", "save_images=false"])
    t0 = time.perf_counter()
    summary = infer(opts, log=lambda _: None)
    assert time.perf_counter() - t0 < 30  # reconnect waits of 1 + 2 s, refused at once
    stream = json.loads((out / "summary.json").read_text())["stream"]
    assert summary["images"] > 0 and stream["reconnects"] == 0
    assert "2 reconnect attempt(s) failed" in stream["events"][-1]


def test_realtime_mode_drops_frames_a_slow_model_cannot_keep_up_with(clip_dir):
    server, url, _ = _serve(clip_dir)
    try:
        source = open_source(url, realtime=True)
        taken = []
        for frame in source:
            taken.append(frame)
            time.sleep(0.05)  # a model far slower than reading the file
    finally:
        server.shutdown()
    assert source.dropped > 0 and len(taken) + source.dropped == FRAMES
    assert len(taken) < FRAMES


def test_ctrl_c_stops_infer_cleanly_with_the_outputs_so_far(clip_dir, standin_files, tmp_path, monkeypatch):
    from dfineseg.infer import io as io_module
    from dfineseg.infer_cli import infer, resolve_options

    real_write = io_module.ResultWriter.write
    calls = {"n": 0}

    def write_then_interrupt(self, frame, det, track_ids=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_write(self, frame, det, track_ids)

    monkeypatch.setattr(io_module.ResultWriter, "write", write_then_interrupt)
    out = tmp_path / "run"
    opts = resolve_options([f"model={standin_files.onnx}", f"source={clip_dir / 'clip.avi'}", f"out={out}",
                            "progress=false"])
    summary = infer(opts, log=lambda _: None)
    assert summary["images"] == 3 and "interrupted" in summary["stopped"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["images"] == 3 and len(json.loads((out / "images.json").read_text())) == 3
    assert (out / "clip.mp4").is_file()
