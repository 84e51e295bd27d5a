"""The resume policy: which settings a resumed run takes from its checkpoint, and which overrides it applies
or refuses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dfineseg.infer.errors import UserError
from dfineseg.model.checkpoint import config_from_checkpoint
from dfineseg.overrides import ConfigError

# Settings that may differ from the checkpoint's on resume: they change neither the model, the data order
# nor the optimisation up to the checkpoint, so the continued run is the same run. `train.epochs` re-plans
# the learning-rate schedule's length from the current step on; the sections training never reads (export,
# infer, bench) are stored with the run for later commands.
RESUME_CHANGEABLE = (
    "train.device", "data.workers", "data.path", "train.epochs", "train.patience", "train.save_every_steps",
    "train.save_every_epochs", "train.checkpoint_minutes", "train.val_every", "train.plot_images", "train.tensorboard",
    "train.max_nonfinite", "eval.batch", "eval.plots",
)
RESUME_FREE_SECTIONS = ("export", "infer", "bench")


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
            elif not prefix and name == "infer":  # a plain dict checked by infer_cli: key by key, as a section
                out.update({f"infer.{key}": given for key, given in (values.get(name) or {}).items()})
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


def resume_config(cfg: Any, ckpt: dict[str, Any], is_main: bool) -> tuple[Any, int | None]:
    """The checkpoint's own config, and the new `train.epochs` when it was changed (else None). Explicit
    settings that differ from it are applied when they may change on resume (RESUME_CHANGEABLE, printed
    on the main rank) and refused otherwise: a resumed run is the same run, and an override silently
    ignored is a run the user did not ask for."""
    from dfineseg.config import Config, build_config, migrate_config
    from dfineseg.overrides import set_path

    resume = cfg.train.resume
    resume_epochs: int | None = None
    raw_saved = migrate_config(ckpt["config"])  # an older run's missing keys hold the defaults it trained with
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
                resume_epochs = int(given)
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
    if applied and is_main:
        print(f"resume {resume}: applying " + "; ".join(applied)
              + (" (the learning-rate schedule is re-planned for the new length)" if resume_epochs else ""),
              file=sys.stderr)
    return build_config(saved, f"config of {resume}"), resume_epochs
