"""`dfineseg val`: run a model on a dataset split and score it with the evaluation core.

One path for every caller: training-time validation, `dfineseg val weights=best.pt`, and (through the
`predict` hook) any exported model. A predictor is any callable `predict(images) -> list[Detections]`
taking RGB uint8 images; `torch_predictor` builds one from a PyTorch model with the deployment
pre-processing (`dfineseg.infer.preprocess`), the exported-graph outputs (`DeployModel`) and the shared
post-processing (`dfineseg.infer.postprocess`), so training numbers and deployed numbers agree.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg._callable import make_module_callable

# `dfineseg.val(cfg)` calls `dfineseg.api.val` (this module is also the `val` subcommand's home).
make_module_callable(__name__, "val")

Predict = Callable[[list[np.ndarray]], list[Any]]


def torch_predictor(
    model: Any,
    imgsz: Sequence[int],
    resize: str,
    conf: float,
    device: Any = "cpu",
    topk: int = 100,
    class_conf: Any = None,
    nms_iou: float | None = None,
) -> Predict:
    """A `predict(images)` for a PyTorch DFINESeg: preprocess -> DeployModel -> postprocess."""
    import torch

    from dfineseg.infer.postprocess import postprocess
    from dfineseg.infer.preprocess import preprocess
    from dfineseg.model.dfine import DeployModel

    deploy = DeployModel(model, topk=topk).eval()
    names = ("scores", "labels", "boxes", "mask_logits")

    @torch.no_grad()
    def predict(images: list[np.ndarray]) -> list[Any]:
        batch, metas = preprocess(images, tuple(imgsz), resize)
        outs = deploy(torch.from_numpy(batch).to(device))
        arrays = {name: out.detach().float().cpu().numpy() if out.dtype.is_floating_point else out.cpu().numpy()
                  for name, out in zip(names, outs)}
        return postprocess(arrays, metas, conf=conf, class_conf=class_conf, nms_iou=nms_iou)

    return predict


def predict_index(index: Any, predict: Predict, batch: int = 4, progress: bool = False) -> list[Any]:
    """Detections for every image of a DatasetIndex, in index order (images read as deployment reads them)."""
    from dfineseg.data import read_image

    records = list(index.images)
    out: list[Any] = []
    starts = range(0, len(records), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="val", unit="batch", leave=False)
    for start in starts:
        chunk = records[start : start + batch]
        out.extend(predict([read_image(rec.file) for rec in chunk]))
    return out


# What `dfineseg.evaluate.write_outputs` writes into `out` (plots only with eval.plots).
VAL_OUTPUTS = ("metrics.json", "predictions.json", "images.json")
VAL_PLOTS = ("f1_curve.png", "confusion_matrix.png")

_COLUMNS = ("precision", "recall", "f1", "iou", "map50", "map50_95")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat numbers logged per epoch and offered to `train.best_metric`: `mask_f1`, `box_map50_95`, ...
    for each IoU type the task has, plus `best_f1` / `best_conf` of the threshold sweep."""
    flat: dict[str, float] = {}
    for kind in ("mask", "box"):
        section = metrics.get(kind)
        if not isinstance(section, dict):
            continue
        for key in (*_COLUMNS, "tp", "fp", "fn"):
            if isinstance(section.get(key), int | float):
                flat[f"{kind}_{key}"] = float(section[key])
    sweep = metrics.get("sweep") or {}
    for key in ("best_f1", "best_conf"):
        if isinstance(sweep.get(key), int | float):
            flat[key] = float(sweep[key])
    return flat


def print_summary(metrics: dict[str, Any], file: Any = None) -> None:
    """A small table: one row per IoU type (mask, box), the paper's numbers at `conf` and COCO mAP."""
    import sys

    file = file or sys.stdout
    header = f"{'':6}" + "".join(f"{c:>11}" for c in ("P", "R", "F1", "IoU", "mAP50", "mAP50-95"))
    print(f"conf {metrics.get('conf', float('nan')):.2f}, {metrics.get('images', '?')} images, "
          f"{metrics.get('instances', '?')} instances", file=file)
    print(header, file=file)
    for kind in ("mask", "box"):
        section = metrics.get(kind)
        if isinstance(section, dict):
            print(f"{kind:6}" + "".join(f"{float(section.get(c, float('nan'))):>11.4f}" for c in _COLUMNS), file=file)
    sweep = metrics.get("sweep") or {}
    if "best_f1" in sweep:
        print(f"best F1 {sweep['best_f1']:.4f} at conf {sweep['best_conf']:.2f}", file=file)


def run_val(
    cfg: Any = None,
    *,
    weights: str | Path | None = None,
    data: str | Path | None = None,
    conf: float | None = None,
    out: str | Path | None = None,
    split: str | None = None,
    predict: Predict | None = None,
    task: str | None = None,
    batch: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Score a checkpoint (or any `predict` callable) on a split; writes metrics.json, predictions.json,
    images.json and plots into `out` and returns the metrics dict.

    Predictions are made at the mAP threshold (eval.map_conf, 0.01) so COCO mAP sees the low-score tail;
    the fixed-threshold F1/precision/recall are computed at `conf` inside `evaluate`.
    """
    from dfineseg.config import Config
    from dfineseg.data import load_index
    from dfineseg.evaluate import evaluate
    from dfineseg.infer.errors import UserError
    from dfineseg.utils.outputs import OutputFolder

    cfg = cfg if cfg is not None else Config()
    weights = weights if weights is not None else cfg.eval.weights
    data = data if data is not None else cfg.data.path
    conf = float(conf if conf is not None else cfg.eval.conf)
    split = split or cfg.eval.split
    batch = batch or cfg.eval.batch
    info: dict[str, Any] = {}
    if predict is None:
        if weights is None:
            raise UserError("dfineseg val needs weights=PATH (a best.pt / last.pt checkpoint)")
        suffix = Path(str(weights)).suffix.lower()
        if suffix not in (".pt", ".pth", ".ckpt"):
            predict, info = _exported_predictor(weights, cfg)
        else:
            predict, info = _checkpoint_predictor(weights, cfg)
        task = task or info.get("task")
    if data is None:
        raise UserError("dfineseg val needs data=PATH (a data.yaml, a COCO json or folder)")
    task = task or cfg.model.task
    index = load_index(Path(data).expanduser().resolve(), split, allow_outside_root=cfg.data.allow_outside_root)
    names = info.get("names")
    if names is not None and len(names) != len(index.names):
        raise UserError(
            f"the model knows {len(names)} classes ({names[:5]}...) but {data} has {len(index.names)}; "
            "validate on the dataset the model was trained on"
        )
    if out is None:
        out = cfg.eval.out or _next_dir(Path("runs") / "val" / "exp")
    # Refuse before any work when out= is a file, unwritable, inside the model or the dataset's image
    # folders, or holds a metrics.json/predictions.json/... that dfineseg did not write.
    protect = [weights, data, *sorted({str(Path(rec.file).parent) for rec in index.images})]
    folder = OutputFolder(out, command="val", protect=[p for p in protect if p is not None])
    folder.check_all(VAL_OUTPUTS + (VAL_PLOTS if cfg.eval.plots else ()))
    out = folder.root
    t0 = time.perf_counter()
    predictions = predict_index(index, predict, batch=batch, progress=verbose)
    elapsed = time.perf_counter() - t0
    # The evaluation core writes its files into a fresh folder; each then replaces only its own older copy.
    staging = folder.staging()
    try:
        metrics = evaluate(index, predictions, task, conf, staging, plots=cfg.eval.plots, map_conf=cfg.eval.map_conf,
                           iou_thr=cfg.eval.iou, class_conf=cfg.eval.class_conf, max_det=cfg.eval.max_det)
        for file in sorted(f for f in staging.rglob("*") if f.is_file()):
            folder.promote(file, file.relative_to(staging).as_posix())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        print(f"validated {len(predictions)} images of {data} [{split}] in {elapsed:.1f}s -> {out}")
        print_summary(metrics)
    return metrics


def _checkpoint_predictor(weights: str | Path, cfg: Any) -> tuple[Predict, dict[str, Any]]:
    from dfineseg.train.checkpoint import load_model_from_checkpoint
    from dfineseg.train.distributed import resolve_device

    device = resolve_device(cfg.train.device if cfg.train.device != "auto" else "auto")
    model, info = load_model_from_checkpoint(weights, device=device)
    predict = torch_predictor(
        model, info["imgsz"], info["resize"], conf=cfg.eval.map_conf, device=device, topk=cfg.eval.max_det,
        nms_iou=cfg.eval.nms_iou,
    )
    return predict, info


def _exported_predictor(path: str | Path, cfg: Any) -> tuple[Predict, dict[str, Any]]:
    """Exported models (ONNX, OpenVINO, TensorRT) through the inference package's Predictor: the same
    preprocess / postprocess, so their numbers compare with the checkpoint's."""
    from dfineseg.infer.predictor import Predictor

    predictor = Predictor.load(str(path), nms_iou=cfg.eval.nms_iou, max_det=cfg.eval.max_det)
    info = {"task": predictor.task, "names": list(predictor.names)}

    def predict(images: list[np.ndarray]) -> list[Any]:
        return predictor.predict_batch(images, conf=cfg.eval.map_conf)

    return predict, info


def _next_dir(base: Path) -> Path:
    if not base.exists():
        return base
    n = 2
    while Path(f"{base}{n}").exists():
        n += 1
    return Path(f"{base}{n}")
