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
import resource
import sys
import time
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
    load_checkpoint,
    nonfinite_weights,
    restore_rng,
    save_checkpoint,
)
from dfineseg.train.divergence import (
    NONFINITE_WINDOW,
    NONFINITE_WINDOW_SHARE,
    DivergenceGuard,
    TrainingDiverged,
    diverged_message,
)
from dfineseg.train.ema import ModelEMA, unwrap
from dfineseg.train.epoch_loader import batches, epoch_loader, multiscale_sizer
from dfineseg.train.optim import LRSchedule, build_optimizer
from dfineseg.train.results import ResultsLog, save_prediction_images
from dfineseg.train.resume import RESUME_CHANGEABLE, RESUME_FREE_SECTIONS, resume_config
from dfineseg.train.run_folder import RunFolder, increment_run_dir, remove_stale_temp_files
from dfineseg.train.sampler import ResumableBatchSampler

# The public names, with those that moved to divergence / resume / run_folder: callers and tests still
# import them from here.
__all__ = [
    "NONFINITE_WINDOW", "NONFINITE_WINDOW_SHARE", "RESUME_CHANGEABLE", "RESUME_FREE_SECTIONS", "Trainer",
    "TrainingDiverged", "default_best_metric", "increment_run_dir", "memory_text", "remove_stale_temp_files",
    "seed_everything", "split_losses", "targets_to",
]


# ---------------------------------------------------------------- small helpers
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


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
            cfg, self.resume_epochs = resume_config(cfg, self.resume_ckpt, self.dist.is_main)
        self.cfg = cfg
        self.tcfg = cfg.train
        self.device = self.dist.device
        # A test may wrap the criterion (e.g. to inject a NaN); users never need this.
        self.criterion_hook = criterion_hook
        self.stop_reason = ""

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
        outside = cfg.data.allow_outside_root
        self.train_index = load_index(cfg.data.path, cfg.data.train_split, allow_outside_root=outside)
        self.val_index = load_index(cfg.data.path, cfg.data.val_split, allow_outside_root=outside)
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
        self.folder = RunFolder.open(cfg, self.train_index, self.val_index, self.resume_ckpt is not None, self.is_main)
        self.run_dir, self.outputs = self.folder.path, self.folder.outputs
        # Checkpoints of this run (name -> step): on divergence the message names what is kept.
        self.saved_checkpoints: dict[str, int] = {}
        if self.resume_ckpt is not None:
            self.saved_checkpoints = {n: int(self.resume_ckpt["step"]) for n in ("last.pt", "best.pt")
                                      if (self.run_dir / n).is_file()}

        # Augmentation randomness is drawn per item from (seed, epoch, index) inside the dataset, so it is
        # the same with any number of workers and after a resume.
        self.train_set = SegmentationDataset(self.train_index, cfg.data.imgsz, True, cfg.data.augment, cfg.data.resize,
                                             seed=tcfg.seed, epochs=tcfg.epochs)
        self.sampler = ResumableBatchSampler(
            len(self.train_set), tcfg.batch, seed=tcfg.seed, shuffle=True,
            rank=self.dist.rank, world_size=self.dist.world_size, imgsz=tuple(cfg.data.imgsz),
            size_for=multiscale_sizer(cfg),
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
        self.divergence = DivergenceGuard(tcfg.max_nonfinite, self._diverged_message, self.is_main)
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
            self.cfg.save(self.folder.claim("config.yaml"))
            self.log = ResultsLog(self.run_dir, tensorboard=tcfg.tensorboard, outputs=self.outputs)
            self._last_plot = 0.0
            if self.resume_ckpt is not None:
                # results.csv rows are 1-based epochs; keep those finished before the checkpoint.
                self.log.load_existing(self.epoch)
        D.barrier()

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
        self.divergence.total = int(ckpt.get("nonfinite_steps", 0))
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
            "nonfinite_steps": self.divergence.total,
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
        save_checkpoint(ckpt, self.folder.claim(name))
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
        loader = epoch_loader(self.train_set, self.sampler, epoch=self.epoch, epoch_batch=self.epoch_batch,
                              total_epochs=self.total_epochs, seed=tcfg.seed, device=self.device,
                              workers=self.cfg.data.workers)
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
        for images, targets in batches(loader):
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
                self.divergence.skipped("loss", self.step, self.epoch)
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

    def _diverged_message(self, reason: str) -> str:
        """`reason` with this run's step, lr advice and kept checkpoints (`divergence.diverged_message`)."""
        return diverged_message(reason, tcfg=self.tcfg, size=self.cfg.model.size, step=self.step, epoch=self.epoch,
                                epoch_batch=self.epoch_batch, run_dir=self.run_dir,
                                saved_checkpoints=self.saved_checkpoints)

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
            self.divergence.skipped("gradient", self.step, self.epoch)
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        self.divergence.finite_step()
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
            if self.divergence.total:
                row["nonfinite_steps"] = self.divergence.total
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
        raw = self._evaluate(preds, self.folder.claim("val"))
        self.final_metrics = headline_metrics(raw)
        from dfineseg.val import print_summary

        print_summary(raw, file=sys.stderr)


_SHOWN = {"mask_f1", "box_f1", "mask_map50_95", "box_map50_95", "best_f1"}
