"""The GPU check's setup: the configuration stand-ins (the schema's defaults without pydantic), settings,
result rows, the time budget and synthetic training batches (`dfineseg.benchmarks.gpu_check`)."""


import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dfineseg.loss.terms import LOSS_WEIGHTS

SCHEMA = 1
NUM_CLASSES = 80  # COCO's class count: the classification head's width as in the papers' numbers
DEFAULT_OUT = Path("runs/gpu_check/gpu_check.json")
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16")  # training: no AMP, bf16 autocast, fp16 autocast + GradScaler

# The configuration schema's defaults, hard-coded because `dfineseg.config` needs pydantic, which the GPU
# image lacks. tests/test_gpu_check.py asserts each equals `dfineseg.config.Config()`'s value.
MASK_HEAD_DEFAULTS: dict[str, Any] = {"fpn_channels": None, "mask_channels": None, "embed_layers": 3, "depthwise": True,
                                      "norm": "bn"}
MODEL_DEFAULTS: dict[str, Any] = {"task": "segment", "num_queries": 300, "num_denoising": 100,
                                  "freeze_backbone": False}
LOSS_DEFAULTS: dict[str, Any] = {
    "focal_alpha": 0.75, "focal_gamma": 2.0, "match_class": 2.0, "match_l1": 5.0, "match_giou": 2.0,
    "match_mask": 1.0, "match_dice": 1.0, "match_alpha": 0.25, "match_gamma": 2.0, "mask_points": 12544,
    "mask_oversample": 3.0, "mask_importance": 0.75, "match_points": 12544, "position_supervised_cls": False,
    "position_modulated_cost": False,
}
TRAIN_DEFAULTS: dict[str, Any] = {"lr": None, "backbone_lr": None, "weight_decay": None, "betas": (0.9, 0.999),
                                  "clip_grad": 0.1, "ema": True, "ema_decay": 0.9998, "ema_warmup": 1000,
                                  "ema_horizon": 0.1}


def model_cfg(size: str) -> SimpleNamespace:
    """What `build_model` reads from a `ModelConfig`, at the schema's defaults."""
    return SimpleNamespace(size=size, mask_head=SimpleNamespace(**MASK_HEAD_DEFAULTS), **MODEL_DEFAULTS)


def loss_cfg() -> SimpleNamespace:
    """What `build_criterion` reads from a `LossConfig`: the weights from the loss terms' table, the rest above."""
    return SimpleNamespace(**{w.key: w.default for w in LOSS_WEIGHTS}, **LOSS_DEFAULTS)


def train_cfg() -> SimpleNamespace:
    """What `build_optimizer`, clipping and the EMA read from a `TrainConfig`."""
    return SimpleNamespace(**TRAIN_DEFAULTS)


# ------------------------------------------------------------------ settings and output
@dataclass
class Settings:
    device: str
    sizes: list[str]
    imgsz: int
    batch: int
    steps: int
    warmup: int
    lat_runs: int
    lat_warmup: int
    orig_hw: tuple[int, int]  # the end-to-end test image's size (an HD frame; resized to imgsz)
    ddp_size: str
    ddp_imgsz: int
    ddp_batch: int
    ddp_steps: int
    budget_s: float
    quick: bool


NORMAL = {"sizes": ["n", "s"], "imgsz": 640, "batch": 8, "steps": 10, "warmup": 3, "lat_runs": 50, "lat_warmup": 10,
          "orig_hw": (720, 1280), "ddp_imgsz": 640, "ddp_batch": 2, "ddp_steps": 3}
QUICK = {"sizes": ["n"], "imgsz": 64, "batch": 2, "steps": 2, "warmup": 1, "lat_runs": 3, "lat_warmup": 1,
         "orig_hw": (96, 128), "ddp_imgsz": 64, "ddp_batch": 1, "ddp_steps": 2}
DDP_RESERVE_S = 60.0  # of --budget, kept for the DDP checks (two process starts each)
GLOO = {"size": "tiny", "imgsz": 64, "batch": 1, "steps": 2}  # a CPU correctness run, not a speed number


class OutPathError(Exception):
    pass


def check_out_path(path: Path) -> None:
    """Refuse an `--out` that exists and is not an earlier gpu_check result (a user's file, another tool's)."""
    if not path.exists():
        return
    if path.is_dir():
        raise OutPathError(f"--out {path} is a folder; give a file name such as {path / DEFAULT_OUT.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and "gpu_check" in data):
        raise OutPathError(f"--out {path} exists and is not an earlier gpu_check result (JSON with a 'gpu_check' "
                           "key); it is left untouched. Choose another --out or move that file away.")


def row(check: str, case: str, status: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"check": check, "case": case, "status": status, **fields}


def skipped(check: str, case: str, reason: str, **fields: Any) -> dict[str, Any]:
    return row(check, case, "skipped", reason=reason, **fields)


def failed(check: str, case: str, exc: BaseException, **fields: Any) -> dict[str, Any]:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = text if len(text) <= 2000 else "..." + text[-2000:]  # a spawned rank's error ends with the exception
    return row(check, case, "failed", error=text, traceback=traceback.format_exc()[-4000:], **fields)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Clock:
    """The run's time budget: later measurements are skipped (and say so) once it is spent."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def spent_reason(self, reserve: float = 0.0) -> str | None:
        """None while more than `reserve` seconds are left (the DDP checks keep DDP_RESERVE_S for themselves)."""
        if self.left() > reserve:
            return None
        return f"time budget of {self.budget_s:.0f} s spent (--budget; {reserve:.0f} s kept for the DDP checks)"


# ------------------------------------------------------------------ training steps
def synthetic_batch(batch: int, imgsz: int, device: Any, seed: int = 0):
    """Random images and 4 random objects per image in the dataset's target layout (cxcywh_norm boxes, bool
    masks at the input resolution, has_mask), as `collate_fn` hands them to the trainer."""
    import torch

    from dfineseg.benchmarks.train_step import _targets

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, imgsz, imgsz, generator=g).to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets(batch, imgsz, imgsz, NUM_CLASSES, seed)]
    return images, targets


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


