"""The run's state in a checkpoint: what last.pt / best.pt hold (model, EMA, optimizer, schedule, scaler,
progress counters, RNG states, config, classes), written only with finite weights and only over files of
this run, and restored on resume so the run continues exactly where it stopped.

The file format itself (atomic writes, schema version, migration, RNG capture) is `checkpoint.py`'s.
`Trainer` (trainer.py) mixes this in.
"""

from __future__ import annotations

from typing import Any

from dfineseg.model.checkpoint import CHECKPOINT_SCHEMA, nonfinite_weights, save_checkpoint
from dfineseg.train.best_model import key_from_checkpoint
from dfineseg.train.divergence import TrainingDiverged
from dfineseg.train.ema import unwrap
from dfineseg.train.rng_state import capture_rng, restore_rng
from dfineseg.train.setup import seed_everything


class RunState:
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
            "best_key": list(self.best_key) if self.best_key is not None else None,
            "best_epoch": self.best_epoch,
            "fitness_history": [[epoch, *key] for epoch, key in self.fitness_history],
            "nonfinite_steps": self.divergence.total,
            "elapsed_s": self._elapsed(),
            "epoch_times": self.epoch_times,
            "val_s": self._val_s,
            "validated_step": self._validated_step,
            "write_s": self._write_s,
            "step_s": max(self._step_times, default=None),
        }

    def save_last(self) -> None:
        if self.is_main:
            self._save("last.pt", with_optimizer=True)

    def _checkpoint_due(self) -> bool:
        """`train.checkpoint_minutes` have passed since last.pt was last written (or the run started): a kill
        in a long epoch loses at most that much training."""
        minutes = self.tcfg.checkpoint_minutes
        return bool(minutes) and self._now() - self._last_save_t >= minutes * 60.0

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
        t0 = self._now()
        save_checkpoint(ckpt, self.folder.claim(name))
        self.saved_checkpoints[name] = self.step
        if name == "last.pt":
            self._last_save_t = self._now()
        self._note_writes(self._now() - t0)  # `time=` keeps room for the saves at the run's end

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
        self.best_key = key_from_checkpoint(ckpt, self.ranking)
        self.best_epoch = int(ckpt.get("best_epoch", -1))
        self.fitness_history = [(int(row[0]), tuple(float(v) for v in row[1:]))
                                for row in ckpt.get("fitness_history") or []]
        self.divergence.total = int(ckpt.get("nonfinite_steps", 0))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.epoch_times = list(ckpt.get("epoch_times", []))
        self._val_s = ckpt.get("val_s")
        self._validated_step = int(ckpt.get("validated_step", -1))
        self._write_s = float(ckpt.get("write_s") or 0.0)
        if ckpt.get("step_s") is not None:  # a resumed run knows its step time before its first step
            self._step_times.append(float(ckpt["step_s"]))
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
