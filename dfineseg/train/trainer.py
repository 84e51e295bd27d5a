"""The training loop: data -> model -> criterion -> AdamW, with EMA, AMP, accumulation, validation each
epoch through the evaluation core, atomic checkpoints, exact resume, time budgets and DDP.

Order of events inside one optimizer step (the resume contract depends on it): `accumulate` micro-batches
(forward, fp32 loss, backward), then unscale + clip, optimizer step, schedule step, EMA update. A
checkpoint is written only at a step boundary, with the number of batches consumed in the epoch, so a
resume skips exactly those batches of the same seeded permutation and restores every RNG.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import random
import re
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfineseg.infer.errors import UserError
from dfineseg.overrides import ConfigError
from dfineseg.train import distributed as D
from dfineseg.train.checkpoint import (
    CHECKPOINT_SCHEMA,
    CheckpointError,
    capture_rng,
    config_from_checkpoint,
    load_checkpoint,
    nonfinite_weights,
    restore_rng,
    save_checkpoint,
)
from dfineseg.train.ema import ModelEMA, unwrap
from dfineseg.train.optim import LRSchedule, build_optimizer, resolve_optim_settings
from dfineseg.train.results import ResultsLog, prediction_image_name, save_prediction_images
from dfineseg.train.sampler import ResumableBatchSampler
from dfineseg.utils.outputs import LEDGER, OutputConflictError, OutputFolder


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite losses or gradients; the last checkpoint with finite weights is kept."""


# The divergence guard: a run stops when this share of the last NONFINITE_WINDOW steps was skipped, or when
# most of its steps so far were (at least two), or after train.max_nonfinite skipped steps in a row.
NONFINITE_WINDOW = 20
NONFINITE_WINDOW_SHARE = 0.5

# Settings that may differ from the checkpoint's on resume: they change neither the model, the data order
# nor the optimisation up to the checkpoint, so the continued run is the same run. `train.epochs` re-plans
# the learning-rate schedule's length from the current step on; the sections training never reads (export,
# infer, bench) are stored with the run for later commands.
RESUME_CHANGEABLE = (
    "train.device", "data.workers", "data.path", "train.epochs", "train.patience", "train.save_every_steps",
    "train.save_every_epochs", "train.val_every", "train.plot_images", "train.tensorboard",
    "train.max_nonfinite", "eval.batch", "eval.plots",
)
RESUME_FREE_SECTIONS = ("export", "infer", "bench")

# Temp files of atomic writes (dfineseg.utils.io: mkstemp prefix ".{name}." suffix ".tmp") of the files the
# trainer writes; a kill -9 in the middle of a save leaves one behind.
_STALE_TEMP = re.compile(
    r"^\.(last\.pt|best\.pt|config\.yaml|results\.csv|results\.png|val_pred_\d+\.jpg)\.[a-z0-9_]{8}\.tmp$"
)


# ---------------------------------------------------------------- small helpers
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def increment_run_dir(project: str | Path, name: str, exist_ok: bool) -> Path:
    """runs/exp, then runs/exp2, runs/exp3 ... unless exist_ok reuses the folder."""
    base = Path(project) / name
    if exist_ok or not base.exists():
        return base
    n = 2
    while (Path(project) / f"{name}{n}").exists():
        n += 1
    return Path(project) / f"{name}{n}"


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files an interrupted checkpoint/result save left in `run_dir` (exact pattern only)."""
    removed = []
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if _STALE_TEMP.match(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _explicit_settings(cfg: Any) -> dict[str, Any]:
    """Dotted key -> value (JSON form) of every setting given explicitly (YAML, overrides, assignment)."""
    from pydantic import BaseModel

    dumped = cfg.to_dict()
    out: dict[str, Any] = {}

    def walk(section: BaseModel, values: dict[str, Any], prefix: str) -> None:
        for name in section.model_fields_set:
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                walk(value, values.get(name) or {}, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = values.get(name)

    walk(cfg, dumped, "")
    return out


def _lookup(tree: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _same_path(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def split_losses(result: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Criterion output (a dict of weighted `loss_*` terms plus counters) -> (total, the dict)."""
    from dfineseg.loss.criterion import total_loss

    if not isinstance(result, dict):
        raise TypeError(f"criterion returned {type(result).__name__}; expected a dict of losses")
    return total_loss(result), result


def memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    # Peak resident memory of this process (ru_maxrss is KiB on Linux).
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}G"


def default_best_metric(name: str, task: str) -> str:
    if task == "detect" and name.startswith("mask_"):
        return "box_" + name[len("mask_"):]
    return name


# ---------------------------------------------------------------- the trainer
class Trainer:
    """`Trainer(cfg).fit()` -> Path of best.pt. `cfg.train.resume=runs/x/last.pt` continues that run."""

    def __init__(self, cfg: Any, criterion_hook: Any = None) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # A loader worker is importing the user's script (workers start from a fork server, see
            # dfineseg.data.dataset.worker_context): the script runs training at import time.
            raise UserError(
                "training was started while a data-loader worker imported your script: put the code that calls "
                "dfineseg.api.train() / Trainer under `if __name__ == \"__main__\":`, or set data.workers=0"
            )
        if cfg.train.gpus > 1 and not D.launched_by_torchrun():
            raise UserError(
                f"train.gpus={cfg.train.gpus} needs one process per GPU: run `make train GPUS={cfg.train.gpus}` or "
                f"`torchrun --standalone --nproc_per_node={cfg.train.gpus} -m dfineseg.cli train ...`"
            )
        self.dist = D.init_distributed(cfg.train.device)
        self.resume_ckpt: dict[str, Any] | None = None
        self.resume_epochs: int | None = None
        if cfg.train.resume:
            self.resume_ckpt = load_checkpoint(cfg.train.resume)
            if self.resume_ckpt.get("optimizer") is None:
                raise CheckpointError(f"{cfg.train.resume}: holds no optimizer state (best.pt); resume from last.pt")
            cfg = self._resume_config(cfg, self.resume_ckpt)
        self.cfg = cfg
        self.tcfg = cfg.train
        self.device = self.dist.device
        # A test may wrap the criterion (e.g. to inject a NaN); users never need this.
        self.criterion_hook = criterion_hook
        self.stop_reason = ""

    def _resume_config(self, cfg: Any, ckpt: dict[str, Any]) -> Any:
        """The checkpoint's own config. Explicit settings that differ from it are applied when they may change
        on resume (RESUME_CHANGEABLE, printed) and refused otherwise: a resumed run is the same run, and an
        override silently ignored is a run the user did not ask for."""
        from dfineseg.config import Config, build_config
        from dfineseg.overrides import set_path

        resume = cfg.train.resume
        raw_saved = ckpt["config"]
        defaults = Config().to_dict()
        saved = config_from_checkpoint(ckpt).to_dict()
        saved["train"]["device"] = cfg.train.device  # machine-dependent: always this machine's
        saved["data"]["workers"] = cfg.data.workers
        saved["train"]["resume"] = resume
        old_path = raw_saved.get("data", {}).get("path")
        saved["data"]["path"] = old_path
        applied: list[str] = []
        refused: list[str] = []
        for key, given in sorted(_explicit_settings(cfg).items()):
            if key in ("schema_version", "train.resume", "train.device", "data.workers"):
                continue
            before = _lookup(raw_saved, key, _lookup(defaults, key))
            if key == "data.path" and _same_path(given, before):
                continue
            if given == before or (isinstance(given, list) and isinstance(before, list | tuple)
                                   and list(before) == given):
                continue
            change = f"{key} {before!r} -> {given!r}"
            if key in RESUME_CHANGEABLE or key.split(".")[0] in RESUME_FREE_SECTIONS:
                set_path(saved, key, given)
                applied.append(change)
                if key == "train.epochs":
                    self.resume_epochs = int(given)
            else:
                refused.append(change)
        if refused:
            changeable = ", ".join(k.replace("train.", "").replace("data.path", "data") for k in RESUME_CHANGEABLE)
            raise ConfigError(
                f"resume={resume} continues that run with the settings stored in it; these overrides cannot "
                f"change on resume: {'; '.join(refused)}. Drop them to resume, or start a new run from its "
                f"weights with model.weights={resume} and the new settings. Settings that may change on "
                f"resume: {changeable}"
            )
        if saved["data"]["path"] is None or not Path(saved["data"]["path"]).exists():
            if cfg.data.path is None:
                raise UserError(
                    f"{resume}: the run's dataset {old_path} is gone; pass data=PATH to resume on its new location"
                )
            saved["data"]["path"] = cfg.data.path
            if not any(a.startswith("data.path ") for a in applied):
                applied.append(f"data.path {old_path!r} -> {cfg.data.path!r}")
        if applied and self.dist.is_main:
            print(f"resume {resume}: applying " + "; ".join(applied)
                  + (" (the learning-rate schedule is re-planned for the new length)" if self.resume_epochs else ""),
                  file=sys.stderr)
        return build_config(saved, f"config of {resume}")

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from dfineseg.data import load_index
        from dfineseg.data.dataset import SegmentationDataset
        from dfineseg.loss.criterion import build_criterion
        from dfineseg.model.dfine import build_model

        cfg, tcfg = self.cfg, self.tcfg
        if cfg.data.path is None:
            raise UserError("training needs data=PATH (a data.yaml, a COCO json or a COCO folder)")
        seed_everything(tcfg.seed + self.dist.rank, tcfg.deterministic)
        # Absolute, so the run's config.yaml and checkpoints (and a resume from another folder) find it.
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
        self.train_index = load_index(cfg.data.path, cfg.data.train_split)
        self.val_index = load_index(cfg.data.path, cfg.data.val_split)
        if self.dist.is_main:  # the same checks as `dfineseg data check`, summarised once per run
            for index in (self.train_index, self.val_index):
                print(index.summary(), file=sys.stderr)
        self.names = list(self.train_index.names)
        self.category_ids = list(self.train_index.category_ids)
        if self.resume_ckpt is not None and list(self.resume_ckpt["names"]) != self.names:
            raise UserError(
                f"resume={tcfg.resume}: the dataset {cfg.data.path} has classes {self.names}, the run was trained "
                f"on {list(self.resume_ckpt['names'])}; resume on the run's dataset, or start a new run with "
                f"model.weights={tcfg.resume}"
            )
        num_classes = len(self.names)
        if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
            raise UserError(
                f"model.num_classes={cfg.model.num_classes} but {cfg.data.path} has {num_classes} classes; "
                "drop model.num_classes (it defaults to the dataset's)"
            )
        self.task = cfg.model.task
        self.best_metric = default_best_metric(tcfg.best_metric, self.task)
        self.is_main = self.dist.is_main
        self._open_run_folder()

        # Augmentation randomness is drawn per item from (seed, epoch, index) inside the dataset, so it is
        # the same with any number of workers and after a resume.
        self.train_set = SegmentationDataset(self.train_index, cfg.data.imgsz, True, cfg.data.augment, cfg.data.resize,
                                             seed=tcfg.seed, epochs=tcfg.epochs)
        self.sampler = ResumableBatchSampler(
            len(self.train_set), tcfg.batch, seed=tcfg.seed, shuffle=True,
            rank=self.dist.rank, world_size=self.dist.world_size, imgsz=tuple(cfg.data.imgsz),
            size_for=self._multiscale_sizer(),
        )

        model = build_model(cfg.model, num_classes)
        if self.resume_ckpt is None:
            for start in (cfg.model.backbone_weights, cfg.model.weights):
                if start:
                    self._load_start_weights(model, start)
        self.model = model.to(self.device)
        self.criterion = build_criterion(cfg.loss, num_classes, self.task)
        if hasattr(self.criterion, "to"):
            self.criterion = self.criterion.to(self.device)
        size = cfg.model.size
        self.optimizer = build_optimizer(self.model, tcfg, size)
        self.steps_per_epoch = max(1, math.ceil(self.sampler.batches_per_epoch() / tcfg.accumulate))
        self.total_epochs = tcfg.epochs
        self.schedule = LRSchedule(self.optimizer, tcfg, self.total_epochs * self.steps_per_epoch)
        self.ema = ModelEMA(self.model, tcfg.ema_decay, tcfg.ema_warmup, horizon=tcfg.ema_horizon,
                            total_steps=self.schedule.total_steps) if tcfg.ema else None
        self.use_amp = bool(tcfg.amp and self.device.type == "cuda")
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(
            "cuda" if self.device.type == "cuda" else "cpu",
            enabled=self.use_amp and self.amp_dtype == torch.float16,
        )
        if self.dist.enabled:
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Some heads (denoising embeddings, encoder aux) see no gradient on some steps.
                find_unused_parameters=True,
            )
        else:
            self.ddp_model = self.model

        # Bookkeeping restored on resume.
        self.epoch = 0
        self.epoch_batch = 0
        self.step = 0
        self.best_fitness: float | None = None
        self.best_epoch = -1
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.nonfinite_recent: deque[bool] = deque(maxlen=NONFINITE_WINDOW)
        self.elapsed_before = 0.0
        self.epoch_times: list[float] = []
        self.last_metrics: dict[str, float] = {}
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
            if self.resume_epochs is not None:
                if self.resume_epochs < self.epoch:
                    raise ConfigError(
                        f"epochs={self.resume_epochs} but {tcfg.resume} has already finished {self.epoch} epochs; "
                        f"pass epochs={self.epoch + 1} or more to train longer, or drop epochs= to resume as planned"
                    )
                self._plan_epochs(self.resume_epochs)
        if self.is_main:
            self.cfg.save(self._claim("config.yaml"))
            self.log = ResultsLog(self.run_dir, tensorboard=tcfg.tensorboard, outputs=self.outputs)
            self._last_plot = 0.0
            if self.resume_ckpt is not None:
                # results.csv rows are 1-based epochs; keep those finished before the checkpoint.
                self.log.load_existing(self.epoch)
        D.barrier()

    # ------------------------------------------------------------------ the run folder
    def _open_run_folder(self) -> None:
        """Pick the run folder and vet it before any work: every file the trainer will write there must be
        new or written by dfineseg before (`OutputFolder`'s ledger), and the run's inputs (dataset files,
        start weights, a resume file not named last.pt) are never written."""
        tcfg = self.tcfg
        if self.resume_ckpt is not None:
            self.run_dir = Path(tcfg.resume).resolve().parent
        else:
            # Rank 0 picks the folder (runs/exp2 ...) so every rank names the same one.
            self.run_dir = Path(D.broadcast_object(str(increment_run_dir(tcfg.project, tcfg.name, tcfg.exist_ok).resolve())))
        if self.resume_ckpt is not None and self.is_main:
            self._adopt_legacy_run_folder()
        D.barrier()
        protect: list[str | Path] = [self.cfg.data.path]
        for index in (self.train_index, self.val_index):
            folders = {Path(rec.file).parent for rec in index.images}
            if index.format == "yolo":
                from dfineseg.data.yolo import label_path_for

                folders |= {label_path_for(Path(rec.file)).parent for rec in index.images}
            protect += sorted(folders)
        for start in (self.cfg.model.weights, self.cfg.model.backbone_weights):
            if start:
                protect.append(start)
        if tcfg.resume and Path(tcfg.resume).name != "last.pt":
            protect.append(tcfg.resume)
        try:
            self.outputs = OutputFolder(self.run_dir, command="train", protect=protect)
        except OutputConflictError as exc:
            raise OutputConflictError(f"{exc} (train: the run folder is project/name, here {self.run_dir})") from None
        names = ["config.yaml", "results.csv", "results.png", "last.pt", "best.pt", "val"]
        if tcfg.tensorboard:
            names.append("tensorboard")
        names += [prediction_image_name(rec) for rec in self.val_index.images[: tcfg.plot_images]]
        for name in names:
            self._check_output(name)
        if self.is_main:
            removed = remove_stale_temp_files(self.run_dir)
            if removed:
                print(f"removed {len(removed)} temp file(s) left in {self.run_dir} by an interrupted save: "
                      + ", ".join(p.name for p in removed), file=sys.stderr)
        # Checkpoints of this run (name -> step): on divergence the message names what is kept.
        self.saved_checkpoints: dict[str, int] = {}
        if self.resume_ckpt is not None:
            self.saved_checkpoints = {n: int(self.resume_ckpt["step"]) for n in ("last.pt", "best.pt")
                                      if (self.run_dir / n).is_file()}

    def _adopt_legacy_run_folder(self) -> None:
        """A run folder written before output ledgers existed holds a dfineseg checkpoint (the resume file
        just loaded) but no ledger: record the trainer's own files as dfineseg's so the resumed run may
        update them. Folders with a ledger are left to it."""
        if (self.run_dir / LEDGER).exists():
            return
        own = ["config.yaml", "results.csv", "results.png", "last.pt", "best.pt", "val", "tensorboard"]
        own += sorted(p.name for p in self.run_dir.glob("val_pred_*.jpg"))
        present = [n for n in own if (self.run_dir / n).exists()]
        if present:
            with open(self.run_dir / LEDGER, "a", encoding="utf-8") as ledger:
                ledger.write("".join(n + "\n" for n in present))

    def _conflict(self, exc: OutputConflictError, rel: str) -> OutputConflictError:
        path = self.run_dir / rel
        if (path.exists() or path.is_symlink()) and not self.outputs.owns(rel):
            return OutputConflictError(
                f"train: {path} already exists and was not written by dfineseg, so it is left untouched; train "
                "into another folder (name=NEW or project=DIR; without exist_ok=true a new folder name2, name3 ... "
                "is picked) or move that file away"
            )
        return OutputConflictError(
            f"train: {path} is one of this run's inputs (dataset files, model.weights or the resume file) and is "
            "never written; choose a run folder outside them with project= / name="
        )

    def _check_output(self, rel: str) -> Path:
        try:
            return self.outputs.check(rel)
        except OutputConflictError as exc:
            raise self._conflict(exc, rel) from None

    def _claim(self, rel: str) -> Path:
        try:
            return self.outputs.claim(rel)
        except OutputConflictError as exc:
            raise self._conflict(exc, rel) from None

    def _multiscale_sizer(self):
        """Per-batch input size for multi-scale training (data.augment.multiscale), None when it is off."""
        from dfineseg.data.dataset import MultiScaleBatchSampler

        ms = self.cfg.data.augment.multiscale
        if ms.p <= 0:
            return None
        # The dataset module's size rule (sizes from (seed, epoch, batch number)), applied to our batches.
        rule = MultiScaleBatchSampler([], self.tcfg.batch, self.cfg.data.imgsz, p=ms.p, min_frac=ms.min_frac,
                                      max_frac=ms.max_frac, seed=self.tcfg.seed, off_epoch=ms.off_epoch)

        def size_for(epoch: int, batch_no: int) -> tuple[int, int]:
            rule.epoch = epoch
            return rule._size(batch_no)

        return size_for

    def _load_start_weights(self, model: nn.Module, path: str) -> None:
        """Starting weights by config: an official D-FINE .pth, an HGNetv2 ImageNet backbone, or a dfineseg
        checkpoint (EMA preferred); with another class count only class-dependent tensors stay fresh."""
        from dfineseg.model.weights import WeightsError, load_weights

        try:
            report = load_weights(model, path)
        except (WeightsError, FileNotFoundError) as exc:
            raise UserError(f"model weights {path}: {exc}") from None
        if self.dist.is_main:
            note = f"; re-initialised {len(report.reinitialised)} class-dependent tensors" if report.reinitialised else ""
            print(f"start weights {path} ({report.kind}, {report.source}): loaded {report.loaded} tensors{note}",
                  file=sys.stderr)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"], ckpt.get("ema_updates", 0))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            self.ema.total_steps = self.schedule.total_steps
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.epoch_batch = int(ckpt.get("epoch_batch", 0))
        self.step = int(ckpt["step"])
        self.best_fitness = ckpt.get("best_fitness")
        self.best_epoch = int(ckpt.get("best_epoch", -1))
        self.nonfinite_total = int(ckpt.get("nonfinite_steps", 0))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.epoch_times = list(ckpt.get("epoch_times", []))
        self.total_epochs = int(ckpt.get("total_epochs", self.total_epochs))
        self.last_metrics = dict(ckpt.get("metrics") or {})
        if self.epoch_batch >= self.sampler.batches_per_epoch():
            self.epoch, self.epoch_batch = self.epoch + 1, 0
        rng = ckpt.get("rng")
        if rng is not None:
            # Each rank saved no RNG of its own (rank 0 writes); ranks > 0 re-seed from the step.
            if self.dist.rank == 0:
                restore_rng(rng)
            else:
                seed_everything(self.tcfg.seed + self.dist.rank + 7919 * self.step)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, with_optimizer: bool = True) -> dict[str, Any]:
        return {
            "schema_version": CHECKPOINT_SCHEMA,
            "config": self.cfg.to_dict(),
            "names": self.names,
            "category_ids": self.category_ids,
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict() if with_optimizer else None,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if with_optimizer else None,
            "epoch": self.epoch,
            "epoch_batch": self.epoch_batch,
            "step": self.step,
            "total_epochs": self.total_epochs,
            "rng": capture_rng(),
            "metrics": self.last_metrics,
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "nonfinite_steps": self.nonfinite_total,
            "elapsed_s": self._elapsed(),
            "epoch_times": self.epoch_times,
        }

    def save_last(self) -> None:
        if self.is_main:
            self._save("last.pt", with_optimizer=True)

    def _save(self, name: str, with_optimizer: bool) -> None:
        """Write run_dir/name: only finite weights (a diverged model never replaces a good checkpoint), only
        over a file dfineseg wrote, atomically (a failed write raises `CheckpointWriteError`)."""
        ckpt = self._checkpoint(with_optimizer=with_optimizer)
        bad = nonfinite_weights(ckpt["model"]) + [f"ema.{k}" for k in nonfinite_weights(ckpt["ema"])]
        if bad:
            raise TrainingDiverged(self._diverged_message(
                f"the weights became non-finite ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) and were "
                "not saved"
            ))
        save_checkpoint(ckpt, self._claim(name))
        self.saved_checkpoints[name] = self.step

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t_start)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        self._t_start = time.perf_counter()
        try:
            self._setup()
            self._t_start = time.perf_counter()
            self._loop()
            return self.run_dir / "best.pt"
        finally:
            if getattr(self, "is_main", False) and hasattr(self, "log"):
                self.log.close()
            D.cleanup()

    def _budget_s(self) -> float | None:
        return self.tcfg.time * 60.0 if self.tcfg.time else None

    def _plan_epochs(self, total: int) -> None:
        """Set the run's length in epochs; the lr schedule and the EMA horizon follow it."""
        if total != self.total_epochs:
            self.total_epochs = total
            self.schedule.set_total(self.total_epochs * self.steps_per_epoch)
            if self.ema is not None:
                self.ema.total_steps = self.schedule.total_steps

    def _refit_to_budget(self, this_epoch_s: float) -> None:
        """`time=`: when an epoch's training ends (before its validation and before `self.epoch` moves on),
        set the total epochs so the run ends inside the budget and refit the schedule's length; rank 0
        decides so every rank agrees. Epochs 0..self.epoch are done, so only whole epochs that still fit are
        added: an epoch that cannot finish would stretch the decay past the budget's end (the run would stop
        with the learning rate raised again), and deciding before validation lets the epoch that becomes the
        last one be validated like any last epoch."""
        budget = self._budget_s()
        if budget is None:
            return
        recent = (self.epoch_times + [this_epoch_s])[-3:]
        per_epoch = sum(recent) / len(recent)
        remaining = budget - self._elapsed() - self._final_val_s
        total = self.epoch + 1 + max(0, int(remaining // max(per_epoch, 1e-6)))
        total = D.broadcast_object(total)
        self._plan_epochs(total)

    def _refit_from_steps(self, budget: float) -> None:
        """`time=`: a first fit from the speed of the first optimizer steps, so even a budget shorter than
        one epoch gets a schedule (warm-up, decay) that ends on time; epochs refine it afterwards."""
        self._budget_fitted = True
        done = self.step - self._first_step
        per_step = max(self._elapsed() - self._elapsed_at_start, 1e-6) / done
        remaining = max(0.0, budget - self._elapsed())
        total_steps = self.step + int(remaining // per_step)
        total = max(self.epoch + 1, math.ceil(total_steps / self.steps_per_epoch))
        total = D.broadcast_object(total)
        if self.is_main:
            # Say what the budget buys: on a busy machine the same minutes give fewer steps (and a weaker
            # model), which should not come as a surprise at the end.
            from tqdm import tqdm

            tqdm.write(f"time budget {budget / 60:.1f} min: {per_step:.2f} s/step so far -> planning {total} "
                       f"epochs ({total * self.steps_per_epoch} steps); refitted after each epoch", file=sys.stderr)
        self._plan_epochs(total)

    def _loop(self) -> None:
        tcfg = self.tcfg
        budget = self._budget_s()
        if budget is not None and self.resume_ckpt is None:
            # Until the first epoch is measured, plan for the configured epochs (refit afterwards).
            self.total_epochs = max(tcfg.epochs, 1)
        self._final_val_s = 0.0
        self._budget_fitted = self.resume_ckpt is not None
        self._first_step, self._elapsed_at_start = self.step, self._elapsed()
        stop = False
        while self.epoch < self.total_epochs and not stop:
            t_epoch = time.perf_counter()
            stop = self._train_epoch()
            finished_epoch = self.epoch_batch >= self.sampler.batches_per_epoch()
            if finished_epoch or stop:
                # Decide on the budget before validating, so the epoch that ends the run is validated and
                # logged like any last epoch.
                if not stop and budget is not None and D.broadcast_object(self._elapsed() >= budget):
                    self.stop_reason = self.stop_reason or f"time budget of {tcfg.time} min reached"
                    stop = True
                if not stop and finished_epoch:
                    self._refit_to_budget(time.perf_counter() - t_epoch)
                last_epoch = self.epoch + 1 >= self.total_epochs
                metrics: dict[str, float] = {}
                t_val = time.perf_counter()
                if stop or last_epoch or (self.epoch + 1) % tcfg.val_every == 0:
                    metrics = self.validate()
                self._final_val_s = max(self._final_val_s, time.perf_counter() - t_val)
                self.epoch_times.append(time.perf_counter() - t_epoch)
                stop = self._end_epoch(metrics) or stop
        self._finish()

    def _micro_batches(self):
        """(images, targets) of this epoch from batch `epoch_batch` on."""
        from dfineseg.data.dataset import collate_fn, worker_options

        self.sampler.set_epoch(self.epoch, self.epoch_batch)
        # Before the workers start (they copy the dataset), so augmentation switch-off epochs apply.
        self.train_set.set_epoch(self.epoch, self.total_epochs)
        # The loader's own generator (seeded per epoch) feeds worker seeds, so it never draws from the
        # global RNG and the data order / augmentation seeds depend only on (seed, epoch).
        gen = torch.Generator().manual_seed(self.tcfg.seed * 1000003 + self.epoch)
        loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            generator=gen,
            # Workers start from a fork server, never by a fork of this process (OpenCV deadlock).
            **worker_options(self.cfg.data.workers),
        )
        return loader

    def _forward_loss(self, images: torch.Tensor, targets: list[dict[str, Any]]):
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()
        with ctx:
            outputs = self.ddp_model(images, targets)
        # The criterion computes the loss in fp32 whatever the forward precision (D-FINE's recipe).
        total, terms = split_losses(self.criterion(outputs, targets))
        if self.criterion_hook is not None:
            total, terms = self.criterion_hook(total, terms)
        return total, terms

    def _train_epoch(self) -> bool:
        """One epoch (or its remainder after a resume). True if the run must stop now."""
        from dfineseg.loss.criterion import aggregate_losses

        tcfg = self.tcfg
        self.ddp_model.train()
        loader = self._micro_batches()
        n_batches = self.sampler.batches_per_epoch()
        sums: dict[str, float] = {}
        count = 0
        bar = None
        if self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=n_batches, initial=self.epoch_batch, desc=f"epoch {self.epoch + 1}/{self.total_epochs}",
                       unit="it", dynamic_ncols=True, file=sys.stderr, leave=True, mininterval=1.0)
        accum = tcfg.accumulate
        budget = self._budget_s()
        micro = 0
        stop = False
        self.optimizer.zero_grad(set_to_none=True)
        for images, targets in self._batches(loader):
            images = images.to(self.device, non_blocking=True)
            targets = targets_to(targets, self.device)
            micro += 1
            boundary = micro % accum == 0 or self.epoch_batch + 1 >= n_batches
            sync = contextlib.nullcontext() if (boundary or not self.dist.enabled) else self.ddp_model.no_sync()
            with sync:
                total, terms = self._forward_loss(images, targets)
                finite = D.all_true(bool(torch.isfinite(total).item()), self.device)
                if finite:
                    self.scaler.scale(total / accum).backward()
            self.epoch_batch += 1
            if not finite:
                self._nonfinite("loss")
                self.optimizer.zero_grad(set_to_none=True)
                micro = 0
            else:
                for k, v in aggregate_losses(terms).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if boundary:
                    self._optimizer_step()
                    micro = 0
                    if budget is not None and not self._budget_fitted and self.step - self._first_step >= 2:
                        self._refit_from_steps(budget)
                    if tcfg.save_every_steps and self.step % tcfg.save_every_steps == 0:
                        self.save_last()
            if bar is not None:
                shown = {k.replace("loss_", ""): f"{v / max(count, 1):.3g}" for k, v in sums.items()
                         if k.startswith("loss")}
                shown["mem"] = memory_text(self.device)
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
            # Every rank must leave the loop at the same batch: any rank over budget stops them all.
            if budget is not None and boundary and not D.all_true(self._elapsed() < budget, self.device):
                self.stop_reason = f"time budget of {tcfg.time} min reached"
                stop = True
                break
        if bar is not None:
            bar.close()
        means = {k: v / max(count, 1) for k, v in sums.items()}
        self.epoch_losses = D.reduce_mean_dict(means)
        return D.broadcast_object(stop)

    @staticmethod
    def _batches(loader):
        """Iterate the loader; a worker process that died becomes one message saying what to do."""
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:
                text = str(exc)
                if "DataLoader worker" not in text or "exited unexpectedly" not in text:
                    raise
                raise UserError(
                    f"a data-loader worker process died ({text.splitlines()[0]}). If the output above says a "
                    "worker imported your script, put the call to dfineseg.api.train() under "
                    "`if __name__ == \"__main__\":`; if it was killed for memory, lower data.workers or train.batch; "
                    "data.workers=0 loads the data in the main process"
                ) from exc
            yield batch

    def _nonfinite(self, what: str) -> None:
        """A skipped step (non-finite loss or gradient). Stops the run when skips are no longer rare: in a
        row (train.max_nonfinite), most steps so far, or half of the recent ones. A run that skips most
        steps is not training, and the few steps that do pass push the weights further out."""
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.nonfinite_recent.append(True)
        if self.is_main:
            print(f"warning: non-finite {what} at step {self.step} (epoch {self.epoch + 1}); step skipped "
                  f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)", file=sys.stderr)
        attempts = self.step + self.nonfinite_total
        recent = sum(self.nonfinite_recent)
        reason = ""
        if self.nonfinite_run >= self.tcfg.max_nonfinite:
            reason = f"{self.nonfinite_run} consecutive non-finite losses or gradients"
        elif self.nonfinite_total >= 2 and self.nonfinite_total > self.step:
            reason = f"{self.nonfinite_total} of the {attempts} steps so far had non-finite losses or gradients"
        elif recent >= NONFINITE_WINDOW * NONFINITE_WINDOW_SHARE:
            reason = (f"{recent} of the last {len(self.nonfinite_recent)} steps had non-finite losses or "
                      "gradients")
        if reason:
            raise TrainingDiverged(self._diverged_message(reason))

    def _diverged_message(self, reason: str) -> str:
        size = self.cfg.model.size
        lr = resolve_optim_settings(self.tcfg, size).lr
        default = resolve_optim_settings(self.tcfg.model_copy(update={"lr": None}), size).lr
        if self.tcfg.lr is None:
            advice = f"train.lr={lr:g} (the default for size={size}); lower it (e.g. lr={lr / 10:g})"
        else:
            advice = f"train.lr={lr:g}; lower it (size={size} defaults to {default:g}; try lr={min(lr / 10, default):g})"
        # At an epoch boundary the counter has already moved on to the next epoch.
        epoch = self.epoch if self.epoch_batch == 0 and self.epoch > 0 else self.epoch + 1
        if self.saved_checkpoints:
            kept = ", ".join(str(self.run_dir / n) for n in sorted(self.saved_checkpoints, key=lambda n: n != "last.pt"))
            at = max(self.saved_checkpoints.values())
            kept = f"The last checkpoints with finite weights are kept: {kept} (up to step {at})."
        else:
            kept = ("No checkpoint was written: the run diverged before its first save, so there is nothing to "
                    "resume from.")
        return (
            f"training diverged at step {self.step} (epoch {epoch}): {reason}. The learning rate is most "
            f"likely too high: {advice} and train again. Keep "
            "gradient clipping on (train.clip_grad) and check the dataset for degenerate boxes (dfineseg data "
            f"check) if a lower lr does not help. {kept}"
        )

    def _optimizer_step(self) -> None:
        tcfg = self.tcfg
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if tcfg.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, tcfg.clip_grad)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            # fp32: a non-finite gradient would poison the weights and the EMA; fp16's scaler skips on its own.
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite("gradient")
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        self.nonfinite_run = 0
        self.nonfinite_recent.append(False)
        if self.ema is not None:
            self.ema.update(self.model)

    # ------------------------------------------------------------------ validation and epoch end
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def validate(self, out_dir: Path | None = None, model: nn.Module | None = None) -> dict[str, float]:
        """Rank 0 scores the EMA (or raw) model on the val split with the evaluation core; the other ranks
        wait. Returns the flat scalar metrics."""
        metrics: dict[str, float] = {}
        if self.is_main:
            from dfineseg.val import headline_metrics, predict_index, torch_predictor

            net = model if model is not None else self.eval_model()
            was_training = net.training
            predict = torch_predictor(
                net, self.cfg.data.imgsz, self.cfg.data.resize, conf=self.cfg.eval.map_conf, device=self.device,
                topk=self.cfg.eval.max_det, nms_iou=self.cfg.eval.nms_iou,
            )
            with torch.no_grad():
                preds = predict_index(self.val_index, predict, batch=self.cfg.eval.batch)
            net.train(was_training)
            raw = self._evaluate(preds, out_dir)
            metrics = headline_metrics(raw)
            self._last_val_preds = preds
        D.barrier()
        return D.broadcast_object(metrics)

    def _evaluate(self, preds: list[Any], out_dir: Path | None) -> dict[str, Any]:
        from dfineseg.evaluate import evaluate

        e = self.cfg.eval
        return evaluate(self.val_index, preds, self.task, e.conf, out_dir, plots=e.plots, map_conf=e.map_conf,
                        iou_thr=e.iou, class_conf=e.class_conf, max_det=e.max_det)

    def _fitness(self, metrics: dict[str, float]) -> float | None:
        if not metrics:
            return None
        if self.best_metric not in metrics:
            raise UserError(
                f"train.best_metric='{self.tcfg.best_metric}' is not a validation metric; choose one of "
                f"{sorted(metrics)}"
            )
        return float(metrics[self.best_metric])

    def _end_epoch(self, metrics: dict[str, float]) -> bool:
        """Log, save last/best, early stopping. True to stop."""
        stop = False
        if metrics:
            self.last_metrics = metrics
        fitness = self._fitness(metrics)
        improved = fitness is not None and (self.best_fitness is None or fitness > self.best_fitness)
        if improved:
            self.best_fitness, self.best_epoch = fitness, self.epoch
        finished_epoch = self.epoch_batch >= self.sampler.batches_per_epoch()
        done_epoch = self.epoch
        if finished_epoch:
            self.epoch, self.epoch_batch = self.epoch + 1, 0
        if self.is_main:
            row: dict[str, Any] = {"epoch": done_epoch + 1, "step": self.step, "time_s": round(self._elapsed(), 1)}
            row.update({f"train/{k}": v for k, v in getattr(self, "epoch_losses", {}).items()})
            for group in self.optimizer.param_groups:
                row[f"lr/{group.get('name', 'group')}"] = group["lr"]
            row.update({f"val/{k}": v for k, v in metrics.items()})
            if self.nonfinite_total:
                row["nonfinite_steps"] = self.nonfinite_total
            self.log.add(row)
            # The plot is redrawn at most every 2 minutes (and at the end): on a small CPU it costs seconds.
            if time.perf_counter() - self._last_plot > 120:
                self.log.plot()
                self._last_plot = time.perf_counter()
            if not finished_epoch or self.epoch % self.tcfg.save_every_epochs == 0 or self.epoch >= self.total_epochs:
                self.save_last()
            if improved or "best.pt" not in self.saved_checkpoints:
                self._save("best.pt", with_optimizer=False)
                if self.tcfg.plot_images and getattr(self, "_last_val_preds", None) is not None:
                    n = self.tcfg.plot_images
                    # Drawn at the sweep's best threshold: predictions are made at 0.01 for mAP.
                    conf = metrics.get("best_conf", self.cfg.eval.conf)
                    shown = [d.filter(d.scores >= conf) for d in self._last_val_preds[:n]]
                    save_prediction_images(self.val_index.images[:n], shown, self.names, self.run_dir,
                                           outputs=self.outputs)
            if metrics:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in _SHOWN)
                print(f"epoch {done_epoch + 1}: {shown or self.best_metric} (best {self.best_metric} "
                      f"{self.best_fitness:.4f} at epoch {self.best_epoch + 1})", file=sys.stderr)
        if self.tcfg.patience and fitness is not None and self.epoch - 1 - self.best_epoch >= self.tcfg.patience:
            self.stop_reason = f"early stopping: no improvement in {self.tcfg.patience} epochs"
            stop = True
        return D.broadcast_object(stop)

    def _finish(self) -> None:
        if self.is_main:
            if self.tcfg.save_every_epochs > 1:
                self.save_last()  # the final state, whatever the save period
            best = self.run_dir / "best.pt"
            if "best.pt" not in self.saved_checkpoints:
                self._save("best.pt", with_optimizer=False)
            self.log.plot()
            reason = self.stop_reason or f"{self.epoch} epochs completed"
            print(f"training finished ({reason}) in {self._elapsed() / 60:.1f} min; best {self.best_metric} "
                  f"{self.best_fitness if self.best_fitness is not None else float('nan'):.4f} -> {best}",
                  file=sys.stderr)
            self._final_report(best)
        D.barrier()

    def _final_report(self, best: Path) -> None:
        """The best weights once more through the full evaluation (plots, metrics.json) into run_dir/val."""
        from dfineseg.train.checkpoint import load_model_from_checkpoint

        model, _ = load_model_from_checkpoint(best, device=self.device)
        from dfineseg.val import headline_metrics, predict_index, torch_predictor

        predict = torch_predictor(model, self.cfg.data.imgsz, self.cfg.data.resize, conf=self.cfg.eval.map_conf,
                                  device=self.device, topk=self.cfg.eval.max_det, nms_iou=self.cfg.eval.nms_iou)
        with torch.no_grad():
            preds = predict_index(self.val_index, predict, batch=self.cfg.eval.batch)
        raw = self._evaluate(preds, self._claim("val"))
        self.final_metrics = headline_metrics(raw)
        from dfineseg.val import print_summary

        print_summary(raw, file=sys.stderr)


_SHOWN = {"mask_f1", "box_f1", "mask_map50_95", "box_map50_95", "best_f1"}
