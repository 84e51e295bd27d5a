"""One epoch of optimizer steps: forward (autocast on CUDA), the criterion in fp32, backward over
`accumulate` micro-batches, then unscale + clip, optimizer step, schedule step, EMA update; non-finite
losses and gradients are skipped and counted by the divergence guard.

A mid-epoch checkpoint (every `train.save_every_steps` steps, and whenever `train.checkpoint_minutes` have
passed since last.pt was written) is written only at a step boundary, with the number of batches consumed
in the epoch, so a resume skips exactly those batches. Under `time=` the epoch stops before a step that
would eat into the time kept for the final validation (`budget.py`). Every rank leaves the epoch at the
same batch. `Trainer` (trainer.py) mixes this in.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

import torch

from dfineseg.train import distributed as D
from dfineseg.train.divergence import diverged_message
from dfineseg.train.epoch_loader import batches, epoch_loader


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


class StepLoop:
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
        # A fresh run trains at least one step whatever the budget; a resumed one may have none left.
        may_stop = self.resume_ckpt is not None
        self.optimizer.zero_grad(set_to_none=True)
        t_step = self._now()
        for images, targets in batches(loader):
            # Before a step begins (no gradients accumulated): every rank stops if one finds it would not
            # end before the reserve.
            if (budget is not None and micro == 0 and (may_stop or self.step > self._first_step)
                    and not D.all_true(self._next_step_fits(budget), self.device)):
                self._stop_for_budget(budget)
                stop = True
                break
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
                    now = self._now()
                    self._note_step(now - t_step)
                    t_step = now
                    if budget is not None and not self._budget_fitted and self.step - self._first_step >= 2:
                        self._refit_from_steps(budget)
                    # By time, the epoch's last step is left to the epoch end (it writes last.pt after validating,
                    # so a resume does not skip that validation).
                    if ((tcfg.save_every_steps and self.step % tcfg.save_every_steps == 0)
                            or (self.epoch_batch < n_batches and self._checkpoint_due())):
                        self.save_last()
            if bar is not None:
                shown = {k.replace("loss_", ""): f"{v / max(count, 1):.3g}" for k, v in sums.items()
                         if k.startswith("loss")}
                shown["mem"] = memory_text(self.device)
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
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
