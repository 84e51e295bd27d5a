"""`dfineseg <command> [--config FILE] key=value ...`: one command shape for every mode.

Subcommands are imported lazily so `dfineseg infer` runs on an edge install without torch or pydantic.
A `UserError` (bad config, dataset, weights, model file, image) is printed as one message and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from dfineseg.infer.errors import UserError

EXAMPLES = {
    "train": "dfineseg train --config configs/demo.yaml data=datasets/demo/data.yaml model.size=n imgsz=320 epochs=30",
    "val": "dfineseg val weights=runs/demo/best.pt data=datasets/demo/data.yaml conf=0.5",
    "export": "dfineseg export weights=runs/demo/best.pt format=onnx,openvino int8=true",
    "infer": "dfineseg infer model=runs/demo/model.onnx source=images/ out=runs/infer conf=0.5",
    "track": "dfineseg track model=runs/demo/model.onnx source=video.mp4 out=runs/track",
    "bench": "dfineseg bench weights=runs/demo/best.pt data=datasets/demo/data.yaml formats=torch,onnx,ov-fp32",
    "data": "dfineseg data check data=datasets/demo/data.yaml | dfineseg data synth datasets/demo --train 200 --val 50",
}

HELP = {
    "train": "train D-FINE-seg on a YOLO or COCO dataset (resume=runs/x/last.pt to continue)",
    "val": "evaluate a checkpoint or exported model on a split (paper F1 + COCO mAP)",
    "export": "export a checkpoint to ONNX / OpenVINO (FP32, FP16, INT8) / TensorRT, parity-checked",
    "infer": "run any model file on images, folders, globs, videos or a webcam",
    "track": "infer with object tracking (ByteTrack style): track ids in the video, tracks.json, mot.txt",
    "bench": "latency and accuracy of every format under the paper's protocol",
    "data": "dataset tools: `check` validates a dataset, `synth` writes the demo dataset",
}


def _config_command(aliases_name: str, api_name: str) -> Callable[[argparse.Namespace], int]:
    """train/val/export/bench: validated Config from --config + overrides, then `dfineseg.api.<name>`."""

    def run(ns: argparse.Namespace) -> int:
        from dfineseg import config as config_module

        aliases = getattr(config_module, aliases_name)
        cfg = config_module.load_config(ns.config, ns.overrides, aliases=aliases)
        api = _import_stage("dfineseg.api", ns.command)
        getattr(api, api_name)(cfg)
        return 0

    return run


def _run_infer(ns: argparse.Namespace) -> int:
    infer_cli = _import_stage("dfineseg.infer_cli", "infer")
    return int(infer_cli.run_infer(ns.overrides, config=ns.config) or 0)


def _run_track(ns: argparse.Namespace) -> int:
    infer_cli = _import_stage("dfineseg.infer_cli", "track")
    return int(infer_cli.run_infer([*ns.overrides, "track=true"], config=ns.config) or 0)


def _run_data(ns: argparse.Namespace) -> int:
    if ns.action == "check":
        from dfineseg.overrides import parse_overrides

        opts = parse_overrides(ns.rest, aliases={"path": "data", "data.allow_outside_root": "allow_outside_root"})
        unknown = set(opts) - {"data", "splits", "allow_outside_root"}
        if unknown or "data" not in opts:
            raise UserError(
                "usage: dfineseg data check data=PATH [splits=[train,val]] [allow_outside_root=true]"
                + (f" (unknown keys: {', '.join(sorted(unknown))})" if unknown else "")
            )
        checks = _import_stage("dfineseg.data.checks", "data check")
        splits = opts.get("splits")
        if isinstance(splits, str):
            splits = [s for s in splits.split(",") if s]
        outside = opts.get("allow_outside_root", False)  # parsed as YAML: true/false arrive as booleans
        if not isinstance(outside, bool):
            raise UserError(f"allow_outside_root={outside!r}: write true or false")
        report = checks.run_check(str(opts["data"]), splits=splits, allow_outside_root=outside)
        return 1 if getattr(report, "fatal", False) else 0
    parser = argparse.ArgumentParser(prog="dfineseg data synth", description="write the generated demo dataset")
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--train", type=int, default=None, help="training images (default 200; 300 with --hard)")
    parser.add_argument("--val", type=int, default=None, help="validation images (default 50; 60 with --hard)")
    parser.add_argument("--coco", action="store_true", help="also write COCO json annotations")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--hard", action="store_true",
                        help="the harder set: 480-960 px images, 3-9 objects from 15 px up, rings and thin bars, "
                             "heavy occlusion, blur and JPEG 85-95")
    args = parser.parse_args(ns.rest)
    synthetic = _import_stage("dfineseg.data.synthetic", "data synth")
    if args.hard:
        from dfineseg.data.synthetic_hard import DEFAULT_COUNTS as defaults
    else:
        defaults = (200, 50)
    default_train, default_val = defaults
    args.train = default_train if args.train is None else args.train
    args.val = default_val if args.val is None else args.val
    if args.train < 0 or args.val < 0:
        raise UserError(f"--train and --val count images: got --train {args.train} --val {args.val}")
    data_yaml = synthetic.write_synthetic_dataset(args.out, n_train=args.train, n_val=args.val, coco=args.coco,
                                                  seed=args.seed, hard=args.hard)
    print(f"wrote {args.train} train + {args.val} val images: {data_yaml}")
    return 0


def _import_stage(module: str, command: str):
    """Import a subcommand's implementation; a stage not built yet says so instead of a traceback."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            raise UserError(f"`dfineseg {command}` is not available in this build ({module} is missing)") from None
        if exc.name in {"torch", "pydantic", "scipy"}:
            raise UserError(
                f"`dfineseg {command}` needs the training extras ({exc.name} is not installed): "
                'pip install "dfineseg[train]"'
            ) from None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfineseg",
        description="D-FINE-seg: train, validate, export, infer and benchmark. "
        "Every command takes `--config FILE` plus `key=value` overrides (`section.key=value` for any config key).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{train,val,export,infer,track,bench,data}")
    handlers = {
        "train": _config_command("TRAIN_ALIASES", "train"),
        "val": _config_command("VAL_ALIASES", "val"),
        "export": _config_command("EXPORT_ALIASES", "export"),
        "bench": _config_command("BENCH_ALIASES", "bench"),
        "infer": _run_infer,
        "track": _run_track,
    }
    for name, handler in handlers.items():
        epilog = f"example: {EXAMPLES[name]}"
        if name in ("infer", "track"):
            from dfineseg.infer_cli import options_help  # torch- and pydantic-free

            epilog = f"{options_help()}\n\n{epilog}"
        p = sub.add_parser(name, help=HELP[name], description=HELP[name], epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", default=None, help="experiment YAML (may `base:` other files)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 model.size=s")
        p.set_defaults(handler=handler)
    p = sub.add_parser("data", help=HELP["data"], description=HELP["data"], epilog=f"example: {EXAMPLES['data']}")
    p.add_argument("action", choices=["check", "synth"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="check: data=PATH; synth: OUT --train N --val M [--coco] [--seed S]")
    p.set_defaults(handler=_run_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from dfineseg import __version__

        print(__version__)
        return 0
    if not ns.command:
        parser.print_help()
        return 2
    try:
        return ns.handler(ns)
    except UserError as exc:
        print(f"dfineseg {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfineseg {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
