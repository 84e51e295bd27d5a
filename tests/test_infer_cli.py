"""`dfineseg infer`: options, every sink, video, errors, and a run on an install without torch/pydantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from test_predictor_standin import (
    CATEGORY_IDS,
    scene,
)

from dfineseg.infer.errors import UserError
from dfineseg.infer.predictor import Predictor
from dfineseg.infer_cli import OPTIONS, resolve_options, run_infer
from dfineseg.overrides import ConfigError


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        cv2.imwrite(str(folder / f"im{i}.png"), scene(30 + i)[:, :, ::-1])
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff junk")
    return folder


def _blocked_imports_dir(tmp_path):
    """A PYTHONPATH folder whose torch.py / pydantic.py raise ImportError, as on an edge install."""
    block = tmp_path / "blocked"
    block.mkdir(exist_ok=True)
    for name in ("torch", "pydantic", "torchvision"):
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is not installed (blocked by the test)')\n")
    return block


def _run_without_torch(tmp_path, args):
    env = {**os.environ, "PYTHONPATH": str(_blocked_imports_dir(tmp_path)), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


# ------------------------------------------------------------------------------------------ options
def test_options_defaults_aliases_and_config(tmp_path):
    opts = resolve_options(["model=m.onnx", "source=imgs", "conf=0.3", "save_txt=true", "infer.threads=2"])
    assert opts["conf"] == 0.3 and opts["save_txt"] is True and opts["threads"] == 2
    assert opts["out"] == OPTIONS["out"][1] and opts["device"] == "cpu" and opts["precision"] is None
    cfg = tmp_path / "infer.yaml"
    cfg.write_text("train:\n  epochs: 3\ninfer:\n  model: a.onnx\n  source: folder\n  conf: 0.7\n  save_crops: true\n")
    opts = resolve_options(["conf=0.2"], config=cfg)
    assert opts["model"] == "a.onnx" and opts["conf"] == 0.2 and opts["save_crops"] is True
    assert resolve_options(["weights=x.pt", "source=0"])["model"] == "x.pt"


@pytest.mark.parametrize(
    "args, message",
    [
        (["source=imgs"], "missing model="),
        (["model=m.onnx", "sorce=imgs"], "did you mean 'source'"),
        (["model=m.onnx", "source=x", "conf=1.5"], "conf=1.5: expected a number in 0..1"),
        (["model=m.onnx", "source=x", "threads=0"], "threads=0"),
        (["model=m.onnx", "source=x", "save_txt=maybe"], "expected true or false"),
        (["model=m.onnx", "source"], "key=value"),
    ],
)
def test_bad_options_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        resolve_options(args)


# ------------------------------------------------------------------------------------------ runs
def test_infer_folder_writes_every_sink(standin_files, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_infer([f"model={standin_files.onnx}", f"source={image_folder}", f"out={out}", "conf=0.4",
                    "save_txt=true", "save_crops=true", "progress=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "onnxruntime on CPUExecutionProvider" in printed and "skipped 1 unreadable" in printed
    assert "zz_broken.jpg" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["conf"] == 0.4
    assert [s["file"] for s in summary["skipped"]] == [str(image_folder / "zz_broken.jpg")]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["im0.png", "im1.png", "im2.png"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["im0.txt", "im1.txt", "im2.txt"]
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == summary["detections"] == len(list((out / "crops").rglob("*.jpg")))
    # the JSON holds exactly what the Predictor returns at that threshold, with the dataset's ids
    predictor = Predictor.load(standin_files.onnx, conf=0.4)
    ids = json.loads((out / "images.json").read_text())
    for image_id, file in ids.items():
        det = predictor.predict(file)
        assert det.to_coco(int(image_id), CATEGORY_IDS) == [r for r in results if r["image_id"] == int(image_id)]


def test_infer_video_with_openvino(standin_files, tmp_path):
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 8, (160, 120))
    for i in range(5):
        writer.write(scene(40 + i)[:, :, ::-1])
    writer.release()
    out = tmp_path / "vid"
    assert run_infer([f"model={standin_files.openvino.parent}", f"source={clip}", f"out={out}", "precision=f32",
                      "progress=false"]) == 0
    video = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 5 and frames[0].shape == (120, 160, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "openvino" and summary["precision"] == "f32" and summary["images"] == 5


def test_infer_glob_and_zero_detections(standin_files, tmp_path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"dark{i}.png"), np.zeros((40, 60, 3), np.uint8))
    out = tmp_path / "run"
    assert run_infer([f"model={standin_files.onnx}", f"source={tmp_path}/dark*.png", f"out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and summary["detections"] == 0 and summary["empty"] == 2
    assert json.loads((out / "predictions.json").read_text()) == []


def test_all_images_unreadable_returns_1(standin_files, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    assert run_infer([f"model={standin_files.onnx}", f"source={folder}", f"out={tmp_path / 'o'}"]) == 1


def test_cli_errors_are_one_message_without_traceback(image_folder, tmp_path):
    from dfineseg.cli import main

    missing = tmp_path / "missing.onnx"
    proc = subprocess.run([sys.executable, "-m", "dfineseg.cli", "infer", f"model={missing}", f"source={image_folder}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model file not found" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(UserError, match="source not found: x"):
        run_infer([f"model={missing}", "source=x"])
    assert main(["infer", "model=m.onnx"]) == 2


# ------------------------------------------------------------------------------------------ edge install
def test_infer_cli_runs_without_torch_and_pydantic(standin_files, image_folder, tmp_path):
    out = tmp_path / "edge"
    proc = _run_without_torch(tmp_path, ["-m", "dfineseg.cli", "infer", f"model={standin_files.onnx}",
                                         f"source={image_folder}", f"out={out}", "progress=false"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["images"] == 3
    assert (out / "predictions.json").is_file() and len(list((out / "images").iterdir())) == 3


def test_track_and_tiles_run_without_torch_pydantic_or_scipy(standin_files, image_folder, tmp_path):
    """The edge install has numpy and OpenCV: the tracker's assignment and the tile merging need no more."""
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 8, (160, 120))
    for _ in range(4):
        writer.write(scene(40)[:, :, ::-1])
    writer.release()
    (_blocked_imports_dir(tmp_path) / "scipy.py").write_text("raise ImportError('scipy is not installed (blocked)')\n")
    out = tmp_path / "track"
    proc = _run_without_torch(tmp_path, ["-m", "dfineseg.cli", "track", f"model={standin_files.onnx}",
                                         f"source={clip}", f"out={out}", "progress=false"])
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "tracks.json").read_text())
    assert records and len({r["track_id"] for r in records}) == sum(r["frame"] == 1 for r in records)
    out = tmp_path / "tiles"
    proc = _run_without_torch(tmp_path, ["-m", "dfineseg.cli", "infer", f"model={standin_files.onnx}",
                                         f"source={image_folder}", f"out={out}", "tile=64", "progress=false"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["images"] == 3


def test_onnx_and_openvino_predict_without_torch(standin_files, tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        for name in ("torch", "pydantic"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(name + " should not be importable in this test")
        from dfineseg.infer.predictor import Predictor
        from dfineseg.infer.io import read_image
        out = {{}}
        for key, path in (("onnx", {str(standin_files.onnx)!r}), ("openvino", {str(standin_files.openvino)!r})):
            det = Predictor.load(path, precision="f32" if key == "openvino" else None).predict(read_image({str(tmp_path / "s.png")!r}))
            out[key] = {{"boxes": det.boxes.tolist(), "labels": det.labels.tolist(), "areas": [int(m.sum()) for m in det.masks]}}
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
        print(json.dumps(out))
        """
    )
    cv2.imwrite(str(tmp_path / "s.png"), scene(50)[:, :, ::-1])
    proc = _run_without_torch(tmp_path, ["-c", script])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = Predictor.load(standin_files.onnx).predict(tmp_path / "s.png")
    assert len(ref) > 0
    for key in ("onnx", "openvino"):
        assert got[key]["labels"] == ref.labels.tolist()
        np.testing.assert_allclose(got[key]["boxes"], ref.boxes, atol=0.05)
        assert got[key]["areas"] == [int(m.sum()) for m in ref.masks]
