"""Building a run from its config: the data, the run folder, the model (and its starting weights), the
criterion, the optimizer with its schedule and EMA, mixed precision, DDP, the progress counters (restored
on resume) and the results log.

`RunSetup._setup` runs these steps in a fixed order that the same-seed and resume promises depend on:
the global RNG is seeded first, the model's initialisation draws from it, and a resume restores every
RNG last. `Trainer` (trainer.py) mixes this in; the steps set the attributes the other parts read.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfineseg.infer.errors import UserError
from dfineseg.overrides import ConfigError
from dfineseg.train import distributed as D
from dfineseg.train.best_model import ranking_metrics
from dfineseg.train.divergence import DivergenceGuard
from dfineseg.train.ema import ModelEMA
from dfineseg.train.epoch_loader import training_data
from dfineseg.train.optim import LRSchedule, build_optimizer
from dfineseg.train.results import ResultsLog
from dfineseg.train.run_folder import RunFolder


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def default_best_metric(name: str, task: str) -> str:
    if task == "detect" and name.startswith("mask_"):
        return "box_" + name[len("mask_"):]
    return name


class RunSetup:
    """`_setup()`: every attribute `fit` needs, built from `self.cfg` (and `self.resume_ckpt`)."""

    def _setup(self) -> None:
        if self.cfg.data.path is None:
            raise UserError("training needs data=PATH (a data.yaml, a COCO json or a COCO folder)")
        seed_everything(self.tcfg.seed + self.dist.rank, self.tcfg.deterministic)
        self._load_data()
        self._open_run_folder()
        self.train_set, self.sampler = training_data(self.cfg, self.train_index, self.dist.rank,
                                                     self.dist.world_size)
        self._build_model()
        self._build_optimization()
        self._build_precision()
        self._wrap_distributed()
        self._start_progress()
        if self.resume_ckpt is not None:
            self._resume_progress()
        if self.is_main:
            self._start_log()
        D.barrier()

    def _load_data(self) -> None:
        """The train and val indexes and their class names, checked against the resumed run and the config."""
        from dfineseg.data import load_index

        cfg, tcfg = self.cfg, self.tcfg
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

    def _open_run_folder(self) -> None:
        """The run folder (vetted before anything is written) and the checkpoints it already holds."""
        self.task = self.cfg.model.task
        self.best_metric = default_best_metric(self.tcfg.best_metric, self.task)
        self.ranking = ranking_metrics(self.best_metric, self.task)  # best_metric, then its tie-breakers
        self.is_main = self.dist.is_main
        self.folder = RunFolder.open(self.cfg, self.train_index, self.val_index, self.resume_ckpt is not None,
                                     self.is_main)
        self.run_dir, self.outputs = self.folder.path, self.folder.outputs
        # Checkpoints of this run (name -> step): on divergence the message names what is kept.
        self.saved_checkpoints: dict[str, int] = {}
        if self.resume_ckpt is not None:
            self.saved_checkpoints = {n: int(self.resume_ckpt["step"]) for n in ("last.pt", "best.pt")
                                      if (self.run_dir / n).is_file()}

    def _build_model(self) -> None:
        """The model (fresh, or from the configured starting weights unless resuming) and the criterion."""
        from dfineseg.loss.criterion import build_criterion
        from dfineseg.model.dfine import build_model, resolve_size_defaults

        cfg = self.cfg
        num_classes = len(self.names)
        dinov2 = cfg.model.backbone.startswith("dinov2_")
        if dinov2 and cfg.model.lora.enabled is None:
            # Resolved once and saved with the run: a checkpoint rebuilds the same model without the weights file.
            cfg.model.lora.enabled = bool(cfg.model.backbone_weights)
        resolve_size_defaults(cfg.model)  # saved with the run, like lora.enabled
        model = build_model(cfg.model, num_classes)
        if self.resume_ckpt is None:
            if cfg.model.backbone_weights and dinov2:
                self._load_dinov2_weights(model, cfg.model.backbone_weights)
            elif cfg.model.backbone_weights:
                self._load_start_weights(model, cfg.model.backbone_weights)
            if cfg.model.weights:
                self._load_start_weights(model, cfg.model.weights)
        if dinov2:
            self._freeze_dinov2_base(model)
        self.model = model.to(self.device)
        self.criterion = build_criterion(cfg.loss, num_classes, self.task)
        if hasattr(self.criterion, "to"):
            self.criterion = self.criterion.to(self.device)

    def _load_dinov2_weights(self, model: nn.Module, path: str) -> None:
        from dfineseg.model.dinov2 import DinoV2WeightsError, load_dinov2_weights

        try:
            n = load_dinov2_weights(model.backbone.vit, Path(path).expanduser())
        except (DinoV2WeightsError, FileNotFoundError) as exc:
            raise UserError(f"model.backbone_weights={path}: {exc}") from None
        if self.dist.is_main:
            print(f"start weights {path} (DINOv2 {self.cfg.model.backbone}): loaded {n} tensors", file=sys.stderr)

    def _freeze_dinov2_base(self, model: nn.Module) -> None:
        """With pretrained DINOv2 weights (LoRA on), the ViT's own weights stay frozen: only LoRA, the feature
        pyramid and the detector train. From random weights the whole backbone trains. Either way, say so."""
        vit = model.backbone.vit
        lora = any(len(block.attn.lora) for block in vit.blocks)
        if lora:
            for name, p in vit.named_parameters():
                if ".lora." not in name:
                    p.requires_grad_(False)
        if self.dist.is_main:
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            how = (f"base ViT frozen, LoRA rank {self.cfg.model.lora.rank} on {'/'.join(self.cfg.model.lora.targets)}"
                   if lora else "no pretrained DINOv2 weights (model.backbone_weights): the whole backbone trains, "
                   "LoRA off")
            print(f"DINOv2 backbone {self.cfg.model.backbone}: {how}; trainable {trainable / 1e6:.2f} M of "
                  f"{total / 1e6:.2f} M parameters", file=sys.stderr)

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
            if report.skipped:
                note += f"; kept out {len(report.skipped)} tensors of its HGNetv2 backbone (this model has DINOv2)"
            print(f"start weights {path} ({report.kind}, {report.source}): loaded {report.loaded} tensors{note}",
                  file=sys.stderr)

    def _build_optimization(self) -> None:
        """AdamW groups, the lr schedule over the planned steps, and the EMA (whose horizon follows them)."""
        tcfg = self.tcfg
        self.optimizer = build_optimizer(self.model, tcfg, self.cfg.model.size)
        self.steps_per_epoch = max(1, math.ceil(self.sampler.batches_per_epoch() / tcfg.accumulate))
        self.total_epochs = tcfg.epochs
        self.schedule = LRSchedule(self.optimizer, tcfg, self.total_epochs * self.steps_per_epoch)
        self.ema = ModelEMA(self.model, tcfg.ema_decay, tcfg.ema_warmup, horizon=tcfg.ema_horizon,
                            total_steps=self.schedule.total_steps) if tcfg.ema else None

    def _build_precision(self) -> None:
        """Autocast on CUDA only (bf16 where supported) and the gradient scaler fp16 needs."""
        self.use_amp = bool(self.tcfg.amp and self.device.type == "cuda")
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(
            "cuda" if self.device.type == "cuda" else "cpu",
            enabled=self.use_amp and self.amp_dtype == torch.float16,
        )

    def _wrap_distributed(self) -> None:
        if self.dist.enabled:
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Some heads (denoising embeddings, encoder aux) see no gradient on some steps.
                find_unused_parameters=True,
            )
        else:
            self.ddp_model = self.model

    def _start_progress(self) -> None:
        """The counters a checkpoint stores, at the start of a fresh run."""
        self.epoch = 0
        self.epoch_batch = 0
        self.step = 0
        self.best_fitness: float | None = None  # best_metric of best.pt's epoch (shown; the tuple decides)
        self.best_key: tuple[float, ...] | None = None
        self.best_epoch = -1
        self.fitness_history: list[tuple[int, tuple[float, ...]]] = []  # (epoch, key) of validated epochs
        self.divergence = DivergenceGuard(self.tcfg.max_nonfinite, self._diverged_message, self.is_main)
        self.elapsed_before = 0.0
        self.epoch_times: list[float] = []  # training seconds of each finished epoch (for `time=`)
        self._start_timing()
        self.last_metrics: dict[str, float] = {}

    def _resume_progress(self) -> None:
        """Everything the resumed checkpoint holds, then the run's new length if `epochs=` changed it."""
        self._restore(self.resume_ckpt)
        if self.resume_epochs is not None:
            if self.resume_epochs < self.epoch:
                raise ConfigError(
                    f"epochs={self.resume_epochs} but {self.tcfg.resume} has already finished {self.epoch} epochs; "
                    f"pass epochs={self.epoch + 1} or more to train longer, or drop epochs= to resume as planned"
                )
            self._plan_epochs(self.resume_epochs)

    def _start_log(self) -> None:
        """Rank 0: the run's config.yaml and results log (a resume keeps the rows of the finished epochs)."""
        self.cfg.save(self.folder.claim("config.yaml"))
        self.log = ResultsLog(self.run_dir, tensorboard=self.tcfg.tensorboard, outputs=self.outputs)
        self._last_plot = 0.0
        if self.resume_ckpt is not None:
            # results.csv rows are 1-based epochs; keep those finished before the checkpoint.
            self.log.load_existing(self.epoch)
