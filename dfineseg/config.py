"""One validated schema for every section of an experiment.

A config is one YAML file (optionally `base:` other files: a base file + model size + dataset) plus
`key.sub=value` overrides. Unknown keys are rejected with a did-you-mean suggestion, wrong types name
the key path and the expected type, and the resolved config is saved in every run folder and checkpoint
together with `SCHEMA_VERSION`.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from dfineseg.export.formats import BENCH_FORMAT_NAMES, EXPORT_FORMAT_NAMES
from dfineseg.infer.postprocess import DEFAULT_NMS_IOU
from dfineseg.infer_cli import OPTIONS as INFER_OPTIONS
from dfineseg.infer_cli import check_options as check_infer_options
from dfineseg.loss.terms import LOSS_WEIGHTS
from dfineseg.overrides import ConfigError, deep_merge, load_yaml_with_bases, parse_overrides

# 2: model.memory_fusion defaults to dense and data.augment.copy_paste.p to 0.5 (measured, docs/BENCHMARKS.md
# "Seed techniques"); configs written as version 1 keep version 1's defaults for the keys they lack (`migrate_config`).
# 3: model.memory_fusion defaults by size (dense for tiny/n, none for s and larger: BENCHMARKS, "The dense memory
# fusion by size").
# 4: the mask head's widths default by size (32 for n, 64 otherwise: BENCHMARKS, "The mask head's width at N").
SCHEMA_VERSION = 4

ModelSize = Literal["tiny", "n", "s", "m", "l", "x"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _pixels(value: Any) -> int:
    """A whole number of pixels; 128.9 is refused rather than silently cut to 128."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected whole numbers of pixels, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("image sizes are whole numbers of pixels (multiples of 32)")
    return int(value)


def _imgsz(value: Any) -> tuple[int, int]:
    """`640` -> (640, 640); `[480, 640]` -> (H=480, W=640). Whole multiples of 32 only."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        hw = (_pixels(value), _pixels(value))
    elif isinstance(value, list | tuple) and len(value) == 2:
        hw = (_pixels(value[0]), _pixels(value[1]))
    else:
        raise ValueError("expected an int or [height, width]")
    for side in hw:
        if side <= 0 or side % 32:
            raise ValueError(f"each side must be a positive multiple of 32, got {list(hw)}")
    return hw


_DEVICES = "use auto, cpu, cuda, cuda:N or N (GPU N)"


def _train_device(value: Any) -> str:
    """auto | cpu | cuda | cuda:N | mps, or a bare GPU number N (-> cuda:N), as torch and the trainer take it."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a device name; {_DEVICES}")
    text = str(value).strip().lower()
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    match = re.fullmatch(r"cuda:(\d+)", text)
    if match:
        return f"cuda:{int(match.group(1))}"
    if "," in text:
        raise ValueError(
            "several devices; a training process uses one: for several GPUs set gpus=N "
            "(one process per GPU through torchrun), or pick one device: " + _DEVICES
        )
    raise ValueError(f"not a device; {_DEVICES}")


def _comma_list(value: Any) -> Any:
    """`format=onnx,openvino` on the command line arrives as a string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# ---------------------------------------------------------------- data and augmentation
class AugmentStep(Section):
    """An augmentation with a probability and the epoch from which it is switched off (None: never)."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    off_epoch: int | None = None


class MosaicConfig(AugmentStep):
    p: float = Field(0.5, ge=0.0, le=1.0)


class AffineConfig(AugmentStep):
    degrees: float = 0.0
    translate: float = Field(0.1, ge=0.0, le=0.5)
    scale: tuple[float, float] = (0.5, 1.5)
    shear: float = 0.0


class PhotometricConfig(AugmentStep):
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)
    hsv_h: float = Field(0.015, ge=0.0, le=0.5)
    hsv_s: float = Field(0.5, ge=0.0, le=1.0)
    hsv_v: float = Field(0.3, ge=0.0, le=1.0)
    gamma: float = Field(0.2, ge=0.0, le=1.0)
    blur_p: float = Field(0.05, ge=0.0, le=1.0)
    noise_p: float = Field(0.05, ge=0.0, le=1.0)


class MultiScaleConfig(AugmentStep):
    """Per-batch input size drawn from [min, max] in steps of 32 (D-FINE: 480..800 at 640)."""

    p: float = Field(0.0, ge=0.0, le=1.0)
    min_frac: float = Field(0.75, gt=0.0, le=1.0)
    max_frac: float = Field(1.25, ge=1.0, le=2.0)


class AugmentConfig(Section):
    mosaic: MosaicConfig = MosaicConfig()
    affine: AffineConfig = AffineConfig()
    hflip: AugmentStep = AugmentStep(p=0.5)
    photometric: PhotometricConfig = PhotometricConfig()
    multiscale: MultiScaleConfig = MultiScaleConfig()
    # Seed 003 section 5, as measured (docs/BENCHMARKS.md, "Seed techniques"): copy-paste raised mask F1 by more
    # than one sd of the default's runs and is on; mixup and cutmix did not and are off.
    mixup: AugmentStep = AugmentStep(p=0.0)
    cutmix: AugmentStep = AugmentStep(p=0.0)
    copy_paste: AugmentStep = AugmentStep(p=0.5)
    no_aug_last_epochs: int = Field(0, ge=0, description="strong augmentation off for the last N epochs")


class DataConfig(Section):
    path: str | None = Field(None, description="data.yaml (YOLO), a COCO json, or a COCO folder")
    imgsz: tuple[int, int] = (640, 640)
    resize: Literal["stretch", "letterbox"] = "stretch"
    train_split: str = "train"
    val_split: str = "val"
    workers: int = Field(2, ge=0)
    cache_dir: str | None = Field(None, description="index cache; never inside the dataset (default ~/.cache/dfineseg)")
    allow_outside_root: bool = Field(
        False, description="COCO: follow a file_name that leaves the image folder (../x.jpg, /abs/x.jpg); "
        "off: such images are reported and skipped")
    augment: AugmentConfig = AugmentConfig()

    _imgsz = field_validator("imgsz", mode="before")(lambda cls, v: _imgsz(v))

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().exists():
            raise ValueError(f"dataset path does not exist: {value} (point data= at a data.yaml, a COCO json or folder)")
        return value


# ---------------------------------------------------------------- model
class MaskHeadConfig(Section):
    fpn_channels: int | None = Field(None, ge=8, description="width of the stride-8 fusion (paper: 256); default: "
                                     "32 for size n, 64 otherwise, resolved and saved when a run starts")
    mask_channels: int | None = Field(None, ge=8, description="width of the 1/4-resolution features (paper: 256); "
                                      "default: 32 for size n, 64 otherwise, resolved and saved when a run starts")
    embed_layers: int = Field(3, ge=1)
    depthwise: bool = Field(True, description="1/4-resolution block as depthwise 3x3 + 1x1 (False: full 3x3, paper)")
    norm: Literal["bn", "gn"] = Field("bn", description="bn folds into the convs at deployment; gn is the paper's")


class LoraConfig(Section):
    enabled: bool | None = Field(None, description="None: on when model.backbone_weights is given (the trainer "
                                 "writes the choice into the run's config)")
    rank: int = Field(4, ge=1, description="LoRA rank on the DINOv2 attention layers (seed 003: 4)")
    targets: list[Literal["qkv", "proj"]] = Field(["qkv", "proj"], min_length=1,
                                                  description="attention layers that get LoRA")


class ModelConfig(Section):
    size: ModelSize = "n"
    backbone: Literal["hgnetv2", "dinov2_s", "dinov2_b", "dinov2_t"] = Field(
        "hgnetv2", description="hgnetv2 (official D-FINE), or a DINOv2 ViT/14 (dinov2_t: a test-sized ViT)")
    lora: LoraConfig = LoraConfig()
    query_selection: Literal["box", "mask"] = Field(
        "box", description="mask: Mask DINO's unified query selection, the encoder's top tokens predict masks "
        "(supervised) and their boxes start the decoder (seed 001; segment only)")
    decoder_balance: Literal["none", "di"] = Field(
        "none", description="di: DI-MaskDINO's De-Imbalance module, a balance-aware query from a double selection "
        "with token interaction, and its Balance-Aware Tokens Optimization of the decoder's memory (seed 000)")
    memory_fusion: Literal["none", "dense"] | None = Field(
        None, description="Stable-DINO dense memory fusion: backbone, FPN and PAN features per level fused "
        "before the decoder (seed 004); none: the official D-FINE encoder; default: dense for sizes tiny and n, "
        "none for s and larger (where it costs more than 5 % latency), resolved and saved when a run starts")
    task: Literal["detect", "segment"] = "segment"
    num_classes: int | None = Field(None, ge=1, description="default: from the dataset")
    num_queries: int = Field(300, ge=1)
    num_denoising: int = Field(100, ge=0)
    mask_head: MaskHeadConfig = MaskHeadConfig()
    weights: str | None = Field(None, description="official D-FINE .pth or a dfineseg checkpoint to start from")
    backbone_weights: str | None = Field(None, description="HGNetv2 ImageNet weights (keys without 'backbone.'), "
                                         "or an official DINOv2 hub checkpoint for a dinov2 backbone")
    freeze_backbone: bool = False


# ---------------------------------------------------------------- losses and matcher
# The weights (vfl, l1, giou, fgl, ddf, mask_bce, mask_dice) are generated from the loss terms' one table,
# dfineseg/loss/terms.py, which the criterion also reads (names, defaults); torch-free.
_LossWeights = create_model(
    "_LossWeights",
    __base__=Section,
    **{w.key: (float, Field(w.default, description=w.help)) for w in LOSS_WEIGHTS},
)


class LossConfig(_LossWeights):
    focal_alpha: float = 0.75
    focal_gamma: float = 2.0
    match_class: float = 2.0
    match_l1: float = 5.0
    match_giou: float = 2.0
    match_mask: float = 1.0
    match_dice: float = 1.0
    match_alpha: float = 0.25
    match_gamma: float = 2.0
    # Point-sampled masks (dfineseg/loss/mask_points.py); 0 = every pixel (full-map matching costs; the
    # whole GT-box ROI in the losses).
    mask_points: int = Field(12544, ge=0, description="points per instance inside its box ROI for the mask losses")
    mask_oversample: float = Field(3.0, ge=1.0, description="candidates per point for importance sampling")
    mask_importance: float = Field(0.75, ge=0.0, le=1.0, description="share of points picked by uncertainty")
    match_points: int = Field(12544, ge=0, description="pixels per image for the matcher's mask costs")
    # Stable-DINO (seed 004, sections 2.2-2.3); off by default.
    position_supervised_cls: bool = False
    position_modulated_cost: bool = False


# ---------------------------------------------------------------- training
class TrainConfig(Section):
    name: str = "exp"
    project: str = "runs"
    exist_ok: bool = False
    epochs: int = Field(50, ge=1)
    time: float | None = Field(None, gt=0, description="minutes; overrides epochs and fits the schedule to it")
    batch: int = Field(8, ge=1)
    accumulate: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="default: the size's official value")
    backbone_lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = Field(500, ge=0)
    scheduler: Literal["flatcosine", "onecycle", "constant"] = "flatcosine"
    flat_frac: float = Field(0.5, ge=0.0, le=1.0, description="flat part of flat-cosine")
    min_lr_frac: float = Field(0.05, ge=0.0, le=1.0)
    ema: bool = True
    ema_decay: float = Field(0.9998, gt=0, lt=1)
    ema_warmup: int = Field(1000, ge=0)
    ema_horizon: float = Field(0.1, ge=0.0, le=1.0, description="EMA averages over at most this fraction of the "
                               "run's steps (short runs would otherwise keep early weights); 0: off")
    amp: bool = True
    clip_grad: float | None = 0.1
    seed: int = 0
    deterministic: bool = False
    patience: int | None = Field(None, ge=1, description="early stopping: epochs without improvement")
    save_every_steps: int | None = Field(None, ge=1)
    save_every_epochs: int = Field(1, ge=1, description="last.pt every N epochs (and at the end); 1: each epoch")
    checkpoint_minutes: float | None = Field(3.0, gt=0, description="last.pt also whenever this many minutes "
                                             "passed since it was written, mid-epoch at a step boundary (a kill "
                                             "in a long epoch loses at most this much); null: off")
    best_metric: str = "mask_f1"
    max_nonfinite: int = Field(10, ge=1, description="consecutive non-finite steps (loss or gradient) before the run "
                               "stops; it also stops when most steps so far, or half of the last 20, were non-finite")
    val_every: int = Field(1, ge=1)
    plot_images: int = Field(4, ge=0)
    tensorboard: bool = Field(True, description="TensorBoard scalars in <run>/tensorboard (if installed)")
    device: str = "auto"
    resume: str | None = None
    gpus: int = Field(1, ge=1)

    _device = field_validator("device", mode="before")(lambda cls, v: _train_device(v))


# ---------------------------------------------------------------- evaluation, export, bench
class EvalConfig(Section):
    weights: str | None = Field(None, description="checkpoint or exported model to validate")
    out: str | None = Field(None, description="output folder (default runs/val/<name>)")
    conf: float = Field(0.5, ge=0.0, le=1.0)
    class_conf: dict[str, float] | None = None
    iou: float = Field(0.5, ge=0.0, le=1.0, description="match threshold of the paper's protocol (IoU > iou)")
    map_conf: float = Field(0.01, ge=0.0, le=1.0)
    max_det: int = Field(100, ge=1)
    nms_iou: float | None = Field(DEFAULT_NMS_IOU, gt=0, le=1, description="class-aware NMS IoU after the "
                                  "threshold (measured: raises F1, see BENCHMARKS); null: off")
    split: str = "val"
    batch: int = Field(4, ge=1)
    plots: bool = True


class ExportConfig(Section):
    weights: str | None = Field(None, description="the checkpoint to export")
    formats: list[Literal[EXPORT_FORMAT_NAMES]] = ["onnx", "openvino"]
    half: bool = False
    int8: bool = False
    batch: int = Field(1, ge=1)
    dynamic_batch: bool = False
    imgsz: tuple[int, int] | None = None
    topk: int = Field(100, ge=1)
    opset: int = Field(19, ge=17)
    simplify: bool = True
    gather_sampler: bool = Field(False, description="no effect, kept so that older configs load: every export's "
                                 "deformable attention samples by gathering rows, without GridSample")
    parity: bool = True
    parity_images: int = Field(8, ge=1)
    int8_max_drop: float = Field(0.01, ge=0.0)
    int8_drop_confidence: float = Field(
        0.95, ge=0.5, lt=1.0, description="INT8's F1 drop fails its check only when it exceeds int8_max_drop "
        "with this one-sided confidence, given how much the drop moves with which validation images were drawn "
        "(paired bootstrap over the images); 0.5 judges the measured drop as it is")
    int8_calib_size: int = Field(100, ge=1)
    int8_max_iterations: int | None = Field(None, ge=0, description="accuracy control: most layers reverted to float (None: NNCF's default, no limit)")
    int8_control_seconds: float | None = Field(
        90.0, ge=0.0, description="accuracy control (only for an INT8 model that misses int8_max_drop): most "
        "seconds NNCF may spend ranking and reverting layers before the first INT8 model is kept and reported "
        "(None: no limit)")
    workspace_gb: float = Field(4.0, gt=0)
    out: str | None = Field(None, description="default: the checkpoint's folder")

    _imgsz = field_validator("imgsz", mode="before")(lambda cls, v: None if v is None else _imgsz(v))
    _formats = field_validator("formats", mode="before")(lambda cls, v: _comma_list(v))


BENCH_FORMATS = Literal[BENCH_FORMAT_NAMES]


class BenchConfig(Section):
    weights: str | None = Field(None, description="trained checkpoint (the demo model by default)")
    formats: list[BENCH_FORMATS] = ["torch", "onnx", "ov-fp32", "ov-fp16", "ov-int8", "trt-fp16"]
    images: int | None = Field(None, ge=1, description="validation images measured (default: all)")
    warmup: int = Field(10, ge=0)
    threads: int | None = Field(None, ge=1)
    out: str = "runs/bench"
    peers: list[str] = Field([], description="Ultralytics YOLO-seg models exported to ONNX/OpenVINO by the user")
    batch: int = Field(1, ge=1)

    _formats = field_validator("formats", "peers", mode="before")(lambda cls, v: _comma_list(v))


class Config(Section):
    schema_version: int = SCHEMA_VERSION
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    # `dfineseg infer`'s options have one schema, OPTIONS in dfineseg/infer_cli.py (that command runs on an
    # edge install without pydantic). The section is checked with the same function the command uses and
    # kept as written, for a later `dfineseg infer config=<this file>`.
    infer: dict[str, Any] = Field(default_factory=dict)
    bench: BenchConfig = BenchConfig()

    @field_validator("infer", mode="before")
    @classmethod
    def _infer_options(cls, value: Any) -> dict[str, Any]:
        if value is None:  # an empty `infer:` in a YAML file, as `dfineseg infer` reads it
            return {}
        if not isinstance(value, dict):
            raise ValueError("the 'infer' section must be a mapping of infer options")
        check_infer_options(value)  # a ConfigError is a ValueError: reported under `infer`
        return dict(value)

    @model_validator(mode="after")
    def _schema(self) -> Config:
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is newer than this dfineseg ({SCHEMA_VERSION}); upgrade dfineseg"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        """Atomic, like every file of a run folder: a kill leaves the old file or the new one."""
        from dfineseg.utils.io import atomic_write_bytes

        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode("utf-8"))


# Short keys accepted on the command line, per subcommand, so `dfineseg train data=x epochs=3` works.
TRAIN_ALIASES = {
    "data": "data.path", "imgsz": "data.imgsz", "resize": "data.resize", "workers": "data.workers",
    "epochs": "train.epochs", "time": "train.time", "batch": "train.batch", "lr": "train.lr",
    "name": "train.name", "project": "train.project", "seed": "train.seed", "device": "train.device",
    "resume": "train.resume", "amp": "train.amp", "patience": "train.patience", "exist_ok": "train.exist_ok",
    "size": "model.size", "task": "model.task", "weights": "model.weights", "gpus": "train.gpus",
    "conf": "eval.conf",
}
VAL_ALIASES = {
    "weights": "eval.weights", "model": "eval.weights", "data": "data.path", "conf": "eval.conf",
    "split": "eval.split", "out": "eval.out", "imgsz": "data.imgsz", "batch": "eval.batch",
}
EXPORT_ALIASES = {
    "weights": "export.weights", "format": "export.formats", "formats": "export.formats", "half": "export.half",
    "int8": "export.int8", "batch": "export.batch", "dynamic_batch": "export.dynamic_batch",
    "imgsz": "export.imgsz", "topk": "export.topk", "data": "data.path", "out": "export.out",
    "opset": "export.opset", "simplify": "export.simplify", "parity": "export.parity",
    "gather_sampler": "export.gather_sampler",
}
BENCH_ALIASES = {
    "weights": "bench.weights", "data": "data.path", "formats": "bench.formats", "format": "bench.formats",
    "images": "bench.images", "imgsz": "data.imgsz", "out": "bench.out", "threads": "bench.threads",
    "conf": "eval.conf", "peers": "bench.peers", "warmup": "bench.warmup",
}


# Defaults that changed, by the version that changed them: a config written as an older version (a run's
# config.yaml, a checkpoint's config: both dump every key with `schema_version`) that lacks such a key was
# trained with the old default, and must rebuild the same model and recipe. A file without `schema_version`
# (a user's YAML, the command line) gets today's defaults.
CHANGED_DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"model.memory_fusion": "none", "data.augment.copy_paste.p": 0.0},
    3: {"model.memory_fusion": "dense"},
    4: {"model.mask_head.fpn_channels": 64, "model.mask_head.mask_channels": 64},
}


def migrate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Upgrade a config written by an older schema version: keys it lacks take the default of its version."""
    version = raw.get("schema_version")
    if not isinstance(version, int) or version >= SCHEMA_VERSION:
        return raw
    out = copy.deepcopy(raw)
    for changed_in, old_defaults in sorted(CHANGED_DEFAULTS.items()):
        if version >= changed_in:
            continue
        for dotted, old in old_defaults.items():
            node = out
            *parents, leaf = dotted.split(".")
            for part in parents:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                if not isinstance(node, dict):  # a malformed section: validation reports it
                    break
            else:
                node.setdefault(leaf, old)
    out["schema_version"] = SCHEMA_VERSION
    return out


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(sorted(allowed))}"


def _is_section(field: Any) -> bool:
    """A schema field that holds a nested section (a model) rather than a setting."""
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


# Sections whose keys another table checks (see `Config.infer`): section -> its keys.
_OPTION_SECTIONS: dict[str, Any] = {"infer": INFER_OPTIONS}


def _section_names() -> list[str]:
    return [n for n, f in Config.model_fields.items() if _is_section(f) or n in _OPTION_SECTIONS]


def _leaf_paths() -> dict[str, list[str]]:
    """Setting name -> its dotted paths in every section (`batch` -> train.batch, eval.batch, ...)."""
    out: dict[str, list[str]] = {}

    def walk(model: Any, prefix: str) -> None:
        for name, field in model.model_fields.items():
            if _is_section(field):
                walk(field.annotation, f"{prefix}{name}.")
            elif not prefix and name in _OPTION_SECTIONS:
                for key in _OPTION_SECTIONS[name]:
                    out.setdefault(key, []).append(f"{name}.{key}")
            elif prefix:  # top-level settings (schema_version) are not sections' settings
                out.setdefault(name, []).append(f"{prefix}{name}")

    walk(Config, "")
    return out


def _suggest_top_level(key: str, aliases: dict[str, str] | None) -> str:
    """A top-level key that is no section: the command's short forms (`epoch` -> `epochs`), the sections and
    every setting's own name (`warmup_iters` -> `train.warmup_iters`) are the candidates."""
    aliases = aliases or {}
    sections = _section_names()
    leaves = _leaf_paths()
    if key in aliases:  # only possible from a YAML file: short forms are for the command line
        return f"; '{key}' is a command-line short form: in a YAML file write it as {aliases[key]}"
    candidates = list(dict.fromkeys([*aliases, *sections, *leaves]))
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        short = f"; short keys: {', '.join(sorted(aliases))}" if aliases else ""
        return f"; write section.key=value (sections: {', '.join(sections)}){short}"
    name = close[0]
    if name in aliases:
        return f"; did you mean '{name}' ({aliases[name]})?"
    if name in sections:
        return f"; did you mean '{name}' (the section: {name}.KEY)?"
    return "; did you mean " + " or ".join(f"'{p}'" for p in leaves[name]) + "?"


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None or not _is_section(field):
            return []
        model = field.annotation
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, source: str, aliases: dict[str, str] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden" and len(loc) == 1:
            lines.append(f"  - unknown key '{path}'{_suggest_top_level(str(loc[0]), aliases)}")
        elif err["type"] == "extra_forbidden":
            hint = _suggest(str(loc[-1]), _section_fields(loc[:-1]))
            lines.append(f"  - unknown key '{path}'{hint}")
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {path}: {err['msg']}{got_txt}")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], source: str = "config", aliases: dict[str, str] | None = None) -> Config:
    """Validate; `aliases` (the command's short keys) only improve the did-you-mean of unknown keys."""
    try:
        return Config.model_validate(migrate_config(raw))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, aliases)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    aliases: dict[str, str] | None = None,
) -> Config:
    """Base YAML (with its `base:` chain) + overrides -> validated Config."""
    raw: dict[str, Any] = load_yaml_with_bases(path) if path else {}
    aliases = aliases if aliases is not None else TRAIN_ALIASES
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides, aliases)
    if overrides:
        raw = deep_merge(raw, overrides)
    source = str(path) if path else "command line"
    return build_config(raw, source, aliases)
