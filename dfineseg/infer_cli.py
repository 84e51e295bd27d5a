"""`dfineseg infer model=X source=Y [out=Z] [conf=C] ...`: run any model file on images, folders, globs,
videos or a webcam and write annotated images/video, predictions JSON, YOLO txt and crops.

Runs on an edge install without torch and without pydantic: options are parsed with the pydantic-free
`dfineseg.overrides` and checked here against `OPTIONS`; defaults the model knows best (threshold,
input size, resize mode, class names) come from the metadata stored in the model file.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfineseg.infer.postprocess import DEFAULT_NMS_IOU
from dfineseg.overrides import ConfigError, load_yaml_with_bases, parse_overrides


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("expected true or false")


def _fraction(value: Any) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError("expected a number in 0..1")
    return v


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != float(value) or int(value) < 1:
        raise ValueError("expected a positive integer")
    return int(value)


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError("expected a whole number >= 0")
    return int(value)


def _text(value: Any) -> str:
    return str(value)


def _source(value: Any) -> str | int:
    return value if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None or (isinstance(v, str) and v.lower() in ("none", "null", "")) else conv(v)


# key -> (converter, default, help): the one schema of infer options, also of the `infer:` section of a training
# config (dfineseg.config checks it with `check_options`).
OPTIONS: dict[str, tuple[Callable[[Any], Any], Any, str]] = {
    "model": (_text, None, "model file: .pt checkpoint, .onnx, OpenVINO .xml (or its folder), .engine (required)"),
    "source": (_source, None, "image, folder, glob ('dir/*.jpg'), video file, stream URL or webcam index (required)"),
    "out": (_text, "runs/infer", "output folder (created; re-running replaces only files dfineseg wrote there)"),
    "conf": (_optional(_fraction), None, "score threshold (default: the one stored in the model)"),
    "device": (_text, "cpu", "cpu, cuda[:N], auto; OpenVINO also gpu/npu; ONNX Runtime also tensorrt"),
    "precision": (_optional(_text), None, "OpenVINO f32/f16/bf16 (default: the device's), PyTorch fp16 (CUDA)"),
    "half": (_bool, False, "PyTorch checkpoints: fp16 on CUDA"),
    "threads": (_optional(_positive_int), None, "CPU threads for the runtime (default: the runtime's choice)"),
    "backend": (_optional(_text), None, "force a backend: torch, onnxruntime, openvino, tensorrt (default: by file)"),
    "performance": (_text, "latency", "latency or throughput: OpenVINO's hint; throughput also keeps several "
                    "images of a folder or video in flight (OpenVINO) or pipelines them (ONNX Runtime)"),
    "batch": (_optional(_positive_int), None, "images per forward for dynamic-batch models (default 8)"),
    "max_det": (_optional(_positive_int), None, "keep at most this many detections per image (default: all kept)"),
    "nms_iou": (_optional(_fraction), DEFAULT_NMS_IOU, "class-aware NMS IoU after the threshold; none: off "
                "(on by default: it removed duplicates and raised F1 on both measured datasets)"),
    "max_frames": (_optional(_positive_int), None, "stop a video or webcam after this many frames (default: all)"),
    "save_images": (_bool, True, "annotated images (or the annotated video for video/webcam sources)"),
    "save_json": (_bool, True, "predictions.json (COCO results, RLE masks) + images.json (id -> file)"),
    "save_txt": (_bool, False, "YOLO-seg txt per image under labels/"),
    "save_crops": (_bool, False, "box crops per class under crops/"),
    "mask_alpha": (_fraction, 0.45, "mask opacity in the annotated images"),
    "line_width": (_optional(_positive_int), None, "box line width in pixels (default: from the image size)"),
    "show_conf": (_bool, True, "print the score next to the class name"),
    "progress": (_bool, True, "progress bar for folders and videos"),
    "reconnect": (_non_negative_int, 3, "network streams: reopen a dropped stream this many times (waits 1, 2, 4 s ...)"),
    "realtime": (_bool, False, "network streams: drop frames the model cannot keep up with (keep the newest)"),
    "tile": (_optional(_positive_int), None, "tiled inference: window side in pixels of the original image "
             "(small objects on large images); plus the whole image, duplicates merged"),
    "overlap": (_fraction, 0.2, "tiled inference: overlap of neighbouring windows, a fraction of the tile"),
    "track": (_bool, False, "track objects across frames (`dfineseg track` sets it): ids in every output, "
              "tracks.json, mot.txt"),
    "track_high": (_optional(_fraction), None, "tracking: score of a confident detection (default: conf)"),
    "track_low": (_fraction, 0.1, "tracking: lowest score still used to keep a track alive"),
    "track_new": (_optional(_fraction), None, "tracking: score that starts a new track (default: track_high + 0.1)"),
    "track_buffer": (_positive_int, 30, "tracking: frames a lost track waits to be found again"),
    "track_masks": (_bool, False, "tracking: associate by mask IoU instead of box IoU (segment models)"),
}
ALIASES = {"weights": "model", "input": "source", "project": "out", "imgs": "source", "save": "save_images"}

USAGE = "usage: dfineseg infer model=FILE source=IMAGE|FOLDER|GLOB|VIDEO|CAMERA [out=DIR] [conf=C] [key=value ...]"


def options_help() -> str:
    width = max(map(len, OPTIONS))
    lines = [USAGE, "", "options:"]
    for key, (_, default, text) in OPTIONS.items():
        suffix = "" if default is None or "default" in text else f" (default: {default})"
        lines.append(f"  {key:<{width}}  {text}{suffix}")
    return "\n".join(lines)


def _flatten(tree: dict[str, Any], origin: str) -> dict[str, Any]:
    """Top-level keys, plus `infer.key` ones (config files and `infer.conf=0.3` overrides)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "infer" and isinstance(value, dict):
            flat.update(value)
        elif isinstance(value, dict):
            raise ConfigError(f"{origin}: '{key}.…' is not an infer option; {_suggest(key)}")
        else:
            flat[key] = value
    return flat


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(OPTIONS), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(OPTIONS)}"


def check_options(given: dict[str, Any], hint: str = "") -> dict[str, Any]:
    """Short forms -> option names, unknown keys refused with a did-you-mean, values converted.

    The one check of infer options: `dfineseg infer` (its config file's `infer:` section and its command line)
    and the training config's `infer:` section (dfineseg.config) both call it. `hint` ends the unknown-key
    message. Returns only the options given.
    """
    named = {ALIASES.get(k, k): v for k, v in given.items()}
    unknown = [k for k in named if k not in OPTIONS]
    if unknown:
        raise ConfigError(f"unknown infer option '{unknown[0]}'; {_suggest(unknown[0])}{hint}")
    checked: dict[str, Any] = {}
    for key, (conv, _, _) in OPTIONS.items():
        if key not in named:
            continue
        try:
            checked[key] = conv(named[key])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"infer option {key}={named[key]!r}: {exc}") from None
    return checked


def resolve_options(args: list[str], config: str | Path | None = None) -> dict[str, Any]:
    """Defaults < the config file's `infer:` section < command-line key=value pairs; validated."""
    merged: dict[str, Any] = {}
    if config:
        section = load_yaml_with_bases(config).get("infer") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{config}: the 'infer' section must be a mapping")
        merged.update({ALIASES.get(k, k): v for k, v in section.items()})
    cli = _flatten(parse_overrides(list(args)), "command line")
    merged.update({ALIASES.get(k, k): v for k, v in cli.items()})
    given = check_options(merged, hint=f"\n{USAGE}")
    resolved = {key: given.get(key, default) for key, (_, default, _) in OPTIONS.items()}
    missing = [k for k in ("model", "source") if resolved[k] in (None, "")]
    if missing:
        raise ConfigError(f"missing {' and '.join(f'{k}=' for k in missing)}\n{USAGE}")
    return resolved


def _progress(total: int | None, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def infer(opts: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one inference job from resolved options; returns the summary (also written as summary.json)."""
    from dfineseg.infer.io import ResultWriter, SinkOptions, open_source, planned_outputs
    from dfineseg.infer.predictor import Predictor
    from dfineseg.utils.outputs import OutputFolder

    if opts["track"] and opts["tile"]:
        raise ConfigError("tile= with tracking is not supported yet: drop tile= (or track)")
    source = open_source(opts["source"], max_frames=opts["max_frames"], reconnect=opts["reconnect"],
                         realtime=opts["realtime"])
    sinks = SinkOptions(
        save_images=opts["save_images"], save_json=opts["save_json"], save_txt=opts["save_txt"],
        save_crops=opts["save_crops"], mask_alpha=opts["mask_alpha"], line_width=opts["line_width"],
        show_conf=opts["show_conf"], track=opts["track"],
    )
    # Refuse before any work when an output would land on an input (the source images, the model) or on a
    # file dfineseg did not write (e.g. out= a YOLO dataset's root with save_txt: its ground-truth labels).
    folder = OutputFolder(opts["out"], command="infer", protect=[*source.input_paths(), *_model_inputs(opts["model"])])
    folder.check_all([*planned_outputs(source, sinks), "summary.json"])
    backend_options: dict[str, Any] = {"performance": opts["performance"]}
    if opts["half"]:
        backend_options["half"] = True
    predictor = Predictor.load(
        opts["model"],
        device=opts["device"],
        conf=opts["conf"],
        precision=opts["precision"],
        threads=opts["threads"],
        backend=opts["backend"],
        nms_iou=opts["nms_iou"],
        max_det=opts["max_det"],
        batch_size=opts["batch"],
        **backend_options,
    )
    rt = predictor.runtime
    log(
        f"model {predictor.backend.path}: {rt.backend} on {rt.device}, computes in {rt.precision}, "
        f"task={predictor.task}, {len(predictor.names)} classes, input {rt.input_hw[0]}x{rt.input_hw[1]} "
        f"({predictor.info.resize}), conf={predictor.conf:g}"
    )
    writer = ResultWriter(
        folder, predictor.names, predictor.category_ids, sinks,
        video_fps=getattr(source, "fps", None) if source.is_video else None,
    )
    show = opts["progress"] and source.kind != "image"
    start = time.perf_counter()
    stopped = None
    try:
        with predictor, _progress(source.total, show, source.kind) as bar:
            if opts["track"]:  # frames in order, one per forward, through the tracker
                for frame, _, det, ids in predictor.track(((f, f.image) for f in source), _tracker(opts, predictor)):
                    writer.write(frame, det, track_ids=ids)
                    bar.update(1)
            elif (source.is_video or opts["performance"] == "throughput") and not opts["tile"]:
                # Video, or throughput mode on a folder: several frames in flight (OpenVINO's asynchronous
                # requests, ONNX Runtime's pipeline), results written in order.
                for frame, _, det in predictor.stream((f, f.image) for f in source):
                    writer.write(frame, det)
                    bar.update(1)
            else:
                from dfineseg.infer.batching import chunks

                for chunk in chunks(iter(source), predictor.chunk_size(source.total or 1)):
                    if opts["tile"]:
                        found = [predictor.predict_tiled(f.image, opts["tile"], opts["overlap"]) for f in chunk]
                    else:
                        found = predictor.predict_batch([f.image for f in chunk])
                    for frame, det in zip(chunk, found):
                        writer.write(frame, det)
                    bar.update(len(chunk))
                if source.total:  # skipped files were never yielded: finish the bar at the file count
                    bar.update(max(0, source.total - bar.n))
    except KeyboardInterrupt:
        # A clean stop (Ctrl-C on a camera or stream that never ends): everything so far is written.
        stopped = "interrupted by the user; the outputs hold every frame processed before"
    finally:
        summary = writer.close()
    elapsed = time.perf_counter() - start
    skipped = list(source.skipped)
    summary.update(
        {
            "model": str(predictor.backend.path), "backend": rt.backend, "device": rt.device,
            "precision": rt.precision, "source": source.description, "conf": predictor.conf,
            "seconds": round(elapsed, 3), "skipped": [{"file": f, "reason": r} for f, r in skipped],
            "stopped": stopped,
        }
    )
    if hasattr(source, "report"):
        summary["stream"] = source.report()
    out = folder.root
    folder.write_text("summary.json", json.dumps(summary, indent=2))
    n = summary["images"]
    rate = f", {1000 * elapsed / n:.1f} ms/image" if n else ""
    log(f"{n} {'frames' if source.is_video else 'images'}, {summary['detections']} detections "
        f"({summary['empty']} with none){rate} -> {out}")
    for event in summary.get("stream", {}).get("events", []):
        log(event)
    if summary.get("stream", {}).get("dropped_frames"):
        log(f"real time: dropped {summary['stream']['dropped_frames']} frame(s) the model could not keep up with")
    if stopped:
        log(stopped)
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s) (listed in {out / 'summary.json'}):")
        for file, reason in skipped[:20]:
            log(f"  {file}: {reason}")
        if len(skipped) > 20:
            log(f"  ... and {len(skipped) - 20} more")
    return summary


def _tracker(opts: dict[str, Any], predictor: Any) -> Any:
    from dfineseg.infer.track import Tracker

    high = opts["track_high"] if opts["track_high"] is not None else predictor.conf
    if opts["track_low"] > high:
        raise ConfigError(f"track_low={opts['track_low']:g} is above track_high={high:g}; lower track_low")
    return Tracker.from_conf(high, low=opts["track_low"], new_track=opts["track_new"], max_lost=opts["track_buffer"],
                             use_masks=opts["track_masks"] and predictor.task == "segment")


def _model_inputs(model: str) -> list[Path]:
    """The model file as given and the files it resolves to (an OpenVINO folder -> its .xml and .bin)."""
    from dfineseg.infer.backends import resolve_model_path

    given = Path(str(model)).expanduser()
    resolved, backend = resolve_model_path(given)  # a missing model is reported here, before any output
    paths = [given, resolved]
    if backend == "openvino":
        paths.append(resolved.with_suffix(".bin"))
    if resolved.suffix in (".engine", ".plan"):
        paths.append(resolved.with_name(resolved.name + ".json"))
    return paths


def run_infer(args: list[str], config: str | Path | None = None) -> int:
    """Entry point of `dfineseg infer`: 0 on success, 1 when no image could be read.

    Raises `UserError` subclasses (bad option, model file, source) for the CLI to print as one message.
    """
    if any(a in ("-h", "--help", "help") for a in args):
        print(options_help())
        return 0
    summary = infer(resolve_options(args, config))
    if summary["images"] == 0 and summary["skipped"]:
        print(f"dfineseg infer: error: none of the {len(summary['skipped'])} images could be read", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dfineseg.infer_cli key=value ...` (the same as `dfineseg infer`)."""
    from dfineseg.infer.errors import UserError

    try:
        return run_infer(list(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"dfineseg infer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
