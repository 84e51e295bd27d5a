"""The validation hook: score the EMA (or raw) model on the val split through the evaluation core, with
the deployment pre/post-processing, turn the metrics into the run's fitness (`train.best_metric`), and
at the end score best.pt once more into run_dir/val with the full outputs.

Rank 0 validates while the other ranks wait; the flat metrics are broadcast so every rank decides the
same. `Trainer` (trainer.py) mixes this in; a test may override `validate`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfineseg.evaluate import evaluate, headline_metrics, predict_index, print_summary
from dfineseg.infer.errors import UserError
from dfineseg.train import distributed as D
from dfineseg.train.best_model import fitness_key
from dfineseg.train.ema import unwrap

# Val images predicted and scored to estimate a validation's time before the first one (`time=` only).
PROBE_IMAGES = 8


class ValidationHook:
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def validate(self, out_dir: Path | None = None, model: nn.Module | None = None) -> dict[str, float]:
        """Rank 0 scores the EMA (or raw) model on the val split with the evaluation core; the other ranks
        wait. Returns the flat scalar metrics."""
        metrics: dict[str, float] = {}
        if self.is_main:
            net = model if model is not None else self.eval_model()
            was_training = net.training
            with torch.no_grad():
                preds = predict_index(self.val_index, self._predictor(net), batch=self.cfg.eval.batch)
            net.train(was_training)
            raw = self._evaluate(preds, out_dir)
            metrics = headline_metrics(raw)
            self._last_val_preds = preds
        D.barrier()
        return D.broadcast_object(metrics)

    def _estimate_validation_s(self) -> float:
        """`time=` before any validation was measured: the seconds one validation will take, from a few val
        images predicted and scored the way `validate` does (after one untimed image that pays for first-call
        set-up), scaled to the split. The RNG states are put back, so the training run is unchanged."""
        seconds = 0.0
        if self.is_main:
            from dfineseg.train.rng_state import capture_rng, restore_rng

            rng = capture_rng()
            net = self.eval_model()
            was_training = net.training
            images = self.val_index.images
            probe = replace(self.val_index, images=images[: min(len(images), PROBE_IMAGES)])
            with torch.no_grad():
                first = replace(self.val_index, images=images[:1])
                self._evaluate_index(first, predict_index(first, self._predictor(net), batch=1))
                t0 = self._now()
                preds = predict_index(probe, self._predictor(net), batch=self.cfg.eval.batch)
                self._evaluate_index(probe, preds)
                seconds = (self._now() - t0) * len(images) / max(len(probe.images), 1)
            net.train(was_training)
            restore_rng(rng)
        return float(D.broadcast_object(seconds))

    def _predictor(self, net: nn.Module) -> Any:
        """`net` through the deployment path (the PyTorch backend's runner, the Predictor's pre/post-processing),
        predicting at the mAP threshold so COCO mAP sees the low-score tail."""
        from dfineseg.infer.backends.torch import model_predictor
        from dfineseg.model.model_file import deploy_info

        e = self.cfg.eval
        info = deploy_info(self.cfg, self.names, self.category_ids, topk=e.max_det)
        return model_predictor(net, info, self.device, conf=e.map_conf, nms_iou=e.nms_iou, batch_size=e.batch)

    def _evaluate(self, preds: list[Any], out_dir: Path | None) -> dict[str, Any]:
        return self._evaluate_index(self.val_index, preds, out_dir)

    def _evaluate_index(self, index: Any, preds: list[Any], out_dir: Path | None = None) -> dict[str, Any]:
        e = self.cfg.eval
        return evaluate(index, preds, self.task, e.conf, out_dir, plots=e.plots, map_conf=e.map_conf,
                        iou_thr=e.iou, class_conf=e.class_conf, max_det=e.max_det)

    def _fitness(self, metrics: dict[str, float]) -> tuple[float, ...] | None:
        """The tuple this epoch is ranked by (`best_model.fitness_key`: best_metric, then its tie-breakers);
        None when the epoch was not validated."""
        if not metrics:
            return None
        if self.best_metric not in metrics:
            raise UserError(
                f"train.best_metric='{self.tcfg.best_metric}' is not a validation metric; choose one of "
                f"{sorted(metrics)}"
            )
        return fitness_key(metrics, self.ranking)

    def _final_report(self, best: Path) -> None:
        """The best weights once more through the full evaluation (plots, metrics.json) into run_dir/val."""
        from dfineseg.model.model_file import load_model_file

        model = load_model_file(best, device=self.device).model
        with torch.no_grad():
            preds = predict_index(self.val_index, self._predictor(model), batch=self.cfg.eval.batch)
        raw = self._evaluate(preds, self.folder.claim("val"))
        self.final_metrics = headline_metrics(raw)
        print_summary(raw, file=sys.stderr)
