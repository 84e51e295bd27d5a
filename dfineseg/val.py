"""`dfineseg val`: run a model on a dataset split and score it with the evaluation core.

The scoring (and running a predictor over a split) is `dfineseg.evaluate`'s, shared with training-time
validation; this module finds the model for `dfineseg val weights=best.pt` (a checkpoint, an exported
model, or any `predict` hook) and the output folder. A predictor is any callable `predict(images) -> list[Detections]`
taking RGB uint8 images; a checkpoint runs through `dfineseg.infer.backends.torch.model_predictor` (the PyTorch
backend inside the Predictor), an exported model through its own backend in the same Predictor, so
training numbers and deployed numbers agree.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dfineseg.evaluate import Predict, evaluate, predict_index, print_summary

# What `dfineseg.evaluate.write_outputs` writes into `out` (plots only with eval.plots).
VAL_OUTPUTS = ("metrics.json", "predictions.json", "images.json")
VAL_PLOTS = ("f1_curve.png", "confusion_matrix.png")


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
    from dfineseg.infer.backends.torch import model_predictor
    from dfineseg.model.model_file import load_model_file
    from dfineseg.train.distributed import resolve_device

    device = resolve_device(cfg.train.device if cfg.train.device != "auto" else "auto")
    opened = load_model_file(weights, device=device)
    predict = model_predictor(opened.model, opened.deploy_info(topk=cfg.eval.max_det), device,
                              conf=cfg.eval.map_conf, nms_iou=cfg.eval.nms_iou, batch_size=cfg.eval.batch)
    return predict, {"task": opened.task, "names": opened.names}


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
