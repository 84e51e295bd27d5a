"""Loading starting weights: official D-FINE checkpoints, HGNetv2 ImageNet backbones, dfineseg checkpoints.

- Official D-FINE `.pth`: tensors under `ema.module` (preferred) or `model`; loaded key for key into the
  detection part. With another class count only the class-dependent tensors keep their fresh
  initialisation, and the list is returned and logged.
- HGNetv2 ImageNet files: keys without the `backbone.` prefix; loaded into the backbone only.
- dfineseg checkpoints (`schema_version` present): `ema` (preferred) or `model`, mask head included.

Size-dependent buffers (`decoder.anchors`, `decoder.valid_mask`) are never taken from a file: the model
builds them itself. Files are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("dfineseg")

SIZE_DEPENDENT = ("decoder.anchors", "decoder.valid_mask")
_SKIP_SUFFIX = ("num_batches_tracked",)
# Modules of dfineseg's switches that official files never have, with the switch that adds each. From a file
# without them they keep their initialisation (the dense fusion: a pass-through of the plain encoder).
OWN_MODULES = {"encoder.fusion.": "model.memory_fusion=dense", "decoder.balance.": "model.decoder_balance=di"}
OWN_PREFIXES = tuple(OWN_MODULES)


class WeightsError(ValueError):
    """A weights file that cannot be used for this model; the message names the file, key and fix."""


@dataclass
class LoadReport:
    path: str
    kind: str  # "official" | "backbone" | "dfineseg"
    source: str  # where in the file the tensors came from, e.g. "ema.module"
    loaded: int = 0
    reinitialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # file keys of another backbone (DINOv2 model, official file)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (check model.weights / model.backbone_weights)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any reader failure means the same thing to the user)
        raise WeightsError(
            f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            "  It is not a PyTorch checkpoint readable with weights_only=True, or it is truncated "
            "(re-download it)."
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _extract(obj: Any, path: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """-> (kind, source, state_dict)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors (a checkpoint), found {type(obj).__name__}")
    if "schema_version" in obj:
        for key in ("ema", "model"):
            if _is_state_dict(obj.get(key)):
                return "dfineseg", key, obj[key]
        raise WeightsError(f"{path}: dfineseg checkpoint without 'ema' or 'model' weights")
    ema = obj.get("ema")
    if isinstance(ema, dict) and _is_state_dict(ema.get("module")):
        return "official", "ema.module", ema["module"]
    if _is_state_dict(obj.get("model")):
        return "official", "model", obj["model"]
    if _is_state_dict(obj):
        keys = list(obj)
        if all(k.startswith(("stem.", "stages.")) for k in keys):
            return "backbone", "<top level>", obj
        if any(k.startswith(("backbone.", "encoder.", "decoder.")) for k in keys):
            return "official", "<top level>", obj
    found = ", ".join(sorted(map(str, obj))[:8])
    raise WeightsError(
        f"{path}: no model weights found (looked for 'ema.module', 'model', or a plain state_dict with "
        f"'backbone.'/'stem.' keys); top-level keys are: {found}"
    )


def _guess_size(state: dict[str, torch.Tensor], prefix: str = "backbone.") -> str:
    """A hint for error messages: which D-FINE size a state_dict looks like."""
    stem = state.get(prefix + "stem.stem4.conv.weight")
    proj = state.get("encoder.input_proj.0.conv.weight")
    if stem is None:
        return "unknown"
    out = stem.shape[0]
    if out == 16:
        if proj is not None:
            return "n" if proj.shape[1] == 512 else "s"
        return "n or s (HGNetv2-B0)"
    return {32: "m (HGNetv2-B2)", 48: "l (HGNetv2-B4)", 64: "x (HGNetv2-B5)"}.get(out, "unknown")


def _absent_own_modules(model_state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The switch modules this model has and the file lacks entirely (an official file, or a dfineseg checkpoint
    trained without that switch): they keep their initialisation instead of failing the load."""
    return tuple(p for p in OWN_PREFIXES
                 if any(k.startswith(p) for k in model_state) and not any(k.startswith(p) for k in file_state))


def _merge(model_state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor], path: Path, *,
           prefix: str, class_keys: set[str], scope: tuple[str, ...], size: str, fresh: tuple[str, ...] = ()
           ) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """`fresh`: module prefixes that keep the model's own values (`_absent_own_modules`)."""
    merged = dict(model_state)
    reinit: list[str] = []
    loaded = 0
    hint = f"the model is size {size!r}; the file looks like size {_guess_size(file_state, prefix)!r}"
    for key, ours in model_state.items():
        if not key.startswith(scope) or key in SIZE_DEPENDENT or (fresh and key.startswith(fresh)):
            continue
        fkey = key[len("backbone."):] if prefix == "" else key
        theirs = file_state.get(fkey)
        if theirs is None:
            if key.endswith(_SKIP_SUFFIX):
                continue
            raise WeightsError(
                f"{path}: key '{fkey}' is missing from the file (expected shape {tuple(ours.shape)}); "
                f"{hint}. Use weights of the same model size (model.size) or drop model.weights."
            )
        if tuple(theirs.shape) != tuple(ours.shape):
            if key in class_keys:
                reinit.append(key)
                continue
            if key.startswith("mask_head."):
                raise WeightsError(
                    f"{path}: the file's mask head has another width: '{fkey}' is {tuple(theirs.shape)}, this model's "
                    f"{tuple(ours.shape)}. Set model.mask_head.fpn_channels and model.mask_head.mask_channels to the "
                    f"file's (its run's config.yaml lists them; size n defaults to 32 since config schema 4, 64 before)."
                )
            raise WeightsError(
                f"{path}: shape mismatch at '{fkey}': expected {tuple(ours.shape)}, found {tuple(theirs.shape)}; "
                f"{hint}. Use weights of the same model size (model.size)."
            )
        merged[key] = theirs.to(dtype=ours.dtype)
        loaded += 1
    if prefix == "":
        wanted = {k[len("backbone."):] for k in model_state if k.startswith("backbone.")}
    else:
        wanted = set(model_state)
    unexpected = [k for k in file_state if k not in wanted and not k.endswith(_SKIP_SUFFIX)
                  and (prefix == "" or k.startswith(scope)) and k not in SIZE_DEPENDENT]
    own = [(p, switch) for p, switch in OWN_MODULES.items() if any(k.startswith(p) for k in unexpected)]
    if own:
        raise WeightsError(
            f"{path}: the file was trained with {own[0][1]} (it has '{own[0][0]}*' weights) and this model was "
            f"built without it; set {own[0][1]} to load it"
        )
    if unexpected:
        raise WeightsError(
            f"{path}: the file has {len(unexpected)} key(s) this model lacks, first '{unexpected[0]}' "
            f"(shape {tuple(file_state[unexpected[0]].shape)}); {hint}."
        )
    return merged, reinit, loaded


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load any supported weights file into `model` (a DFINESeg) and return what happened."""
    path = Path(path).expanduser()
    kind, source, state = _extract(_read(path), path)
    model_state = model.state_dict()
    size = getattr(model, "size", "?")
    class_keys = set(model.decoder.class_dependent_keys()) if hasattr(model, "decoder") else set()
    fresh = _absent_own_modules(model_state, state)
    if kind == "backbone":
        scope: tuple[str, ...] = ("backbone.",)
        merged, reinit, loaded = _merge(model_state, state, path, prefix="", class_keys=set(), scope=scope,
                                        size=size)
    elif kind == "official":
        skipped: list[str] = []
        scope = ("backbone.", "encoder.", "decoder.")
        if getattr(model, "backbone_name", "hgnetv2") != "hgnetv2":
            # A DINOv2 model takes the official encoder and decoder (same widths); the file's HGNetv2 stays out.
            scope = ("encoder.", "decoder.")
            skipped = [k for k in state if k.startswith("backbone.")]
        merged, reinit, loaded = _merge(model_state, state, path, prefix="backbone.", class_keys=class_keys,
                                        scope=scope, size=size, fresh=fresh)
    else:
        scope = ("backbone.", "encoder.", "decoder.", "mask_head.")
        if any(k.startswith("mask_head.") for k in model_state) != any(k.startswith("mask_head.") for k in state):
            raise WeightsError(
                f"{path}: the checkpoint's task differs from model.task (one has a mask head, the other not); "
                "set model.task to the checkpoint's task"
            )
        merged, reinit, loaded = _merge(model_state, state, path, prefix="backbone.", class_keys=class_keys,
                                        scope=scope, size=size, fresh=fresh)
    model.load_state_dict(merged, strict=True)
    # Only when the file holds a trained encoder and decoder: a backbone-only file leaves both at random, as
    # from scratch, where the fusion trains from its own initialisation (what was measured).
    if kind != "backbone" and "encoder.fusion." in fresh:
        model.encoder.fusion_pass_through()
        log.info("%s has no dense-fusion weights: model.memory_fusion=dense starts as a pass-through of its "
                 "encoder (the loaded model's outputs are unchanged) and learns from there", path)
    report = LoadReport(str(path), kind, source, loaded, reinit,
                        skipped if kind == "official" else [])
    log.info("loaded %d tensors from %s (%s, %s)", loaded, path, kind, source)
    if reinit:
        log.warning("class count differs from %s: re-initialised %d class-dependent tensors: %s",
                    path, len(reinit), ", ".join(reinit))
    return report
