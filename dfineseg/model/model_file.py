"""A model file (a dfineseg checkpoint) opened as a ready model plus the facts deployment needs.

Everything that runs a checkpoint (the PyTorch backend, `dfineseg val`, export, the benchmark, the
trainer's final report) opens it here, and the deployment settings (input size, resize mode, threshold,
top-K, class names, dataset category ids) are derived from it in ONE place, `deploy_info`, with one
rule: a value the caller passes wins, otherwise the checkpoint's own. The file format itself (reading,
writing, migrating) belongs to `dfineseg.model.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfineseg.infer.metadata import ModelInfo


def deploy_info(
    cfg: Any,
    names: Sequence[str],
    category_ids: Sequence[int] | None = None,
    *,
    imgsz: Sequence[int] | None = None,
    conf: float | None = None,
    topk: int | None = None,
    precision: str = "fp32",
    version: str = "",
) -> ModelInfo:
    """The deployment settings of a model trained with config `cfg` (what export stores as metadata).

    imgsz / conf / topk: the caller's choice (a command-line value), else the config's data.imgsz,
    eval.conf and export.topk.
    """
    size = tuple(imgsz) if imgsz else tuple(cfg.data.imgsz)
    return ModelInfo(
        names=list(names),
        category_ids=[int(c) for c in category_ids] if category_ids is not None else list(range(len(names))),
        imgsz=(int(size[0]), int(size[1])),
        resize=str(cfg.data.resize),
        conf=float(cfg.eval.conf if conf is None else conf),
        topk=int(cfg.export.topk if topk is None else topk),
        task=str(cfg.model.task),
        precision=precision,
        version=version,
    )


@dataclass
class ModelFile:
    """A checkpoint opened by `load_model_file`: the rebuilt model (eval mode) and what the file says."""

    path: Path
    model: torch.nn.Module
    config: Any  # dfineseg.config.Config, with paths that only existed on the training machine dropped
    names: list[str]
    category_ids: list[int]
    ema: bool  # the weights are the EMA weights
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    schema_version: int = 1
    dfineseg_version: str = ""

    @property
    def task(self) -> str:
        return str(self.config.model.task)

    def deploy_info(self, **choices: Any) -> ModelInfo:
        """This checkpoint's deployment settings; `choices` (imgsz, conf, topk, precision) override them."""
        return deploy_info(self.config, self.names, self.category_ids, version=self.dfineseg_version, **choices)


def load_model_file(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True) -> ModelFile:
    """Rebuild the model from the file alone (size, task, classes from its config); EMA weights first.

    Raises CheckpointError (a UserError naming the file) for a missing, truncated, foreign or newer
    file, and for weights that do not fit the model its config describes.
    """
    from dfineseg.model.checkpoint import (
        CACHE_SUFFIXES,
        CheckpointError,
        config_from_checkpoint,
        load_checkpoint,
    )
    from dfineseg.model.dfine import build_model

    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt)
    names = list(ckpt["names"])
    model = build_model(cfg.model, len(names))
    use_ema = prefer_ema and ckpt.get("ema") is not None
    missing, unexpected = model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"], strict=False)
    # Size-dependent caches (decoder anchors) may be absent or rebuilt; anything else is a real mismatch.
    real_missing = [k for k in missing if not k.endswith(CACHE_SUFFIXES)]
    if real_missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model built from its config "
            f"(missing {real_missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.to(device).eval()
    return ModelFile(
        path=Path(path),
        model=model,
        config=cfg,
        names=names,
        category_ids=[int(c) for c in (ckpt.get("category_ids") or range(len(names)))],
        ema=use_ema,
        epoch=ckpt.get("epoch"),
        step=ckpt.get("step"),
        metrics=ckpt.get("metrics") or {},
        schema_version=int(ckpt["schema_version"]),
        dfineseg_version=str(ckpt.get("dfineseg_version") or ""),
    )
