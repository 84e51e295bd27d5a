"""`dfineseg val`: a trained checkpoint scored on a split, its files, and its F1 against an independent
implementation of the paper's protocol computed from predictions.json alone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from trained_fixture import trained_run  # noqa: F401  (session fixture; also imported by conftest)


def _independent_mask_f1(pred_json, data_yaml, conf: float) -> float:
    """The paper's protocol written from scratch: full-image masks via pycocotools, class-agnostic greedy
    one-to-one matching by descending IoU over pairs with IoU > 0.5, TP only when the classes agree."""
    from pycocotools import mask as mask_util

    from dfineseg.data import load_index

    index = load_index(data_yaml, "val")
    cat_to_label = {c: i for i, c in enumerate(index.category_ids)}
    preds = json.loads(pred_json.read_text())
    tp = fp = fn = 0
    for rec in index.images:
        h, w = rec.height, rec.width
        gt_rles, gt_labels = [], []
        for inst in rec.instances:
            if inst.iscrowd:
                continue
            polys = [p.reshape(-1).astype(np.float64).tolist() for p in inst.polygons]
            gt_rles.append(mask_util.merge(mask_util.frPyObjects(polys, h, w)))
            gt_labels.append(inst.label)
        mine = [p for p in preds if p["image_id"] == rec.image_id and p["score"] >= conf]
        if not mine or not gt_rles:
            fp += len(mine)
            fn += len(gt_rles)
            continue
        dt_rles = [{"size": p["segmentation"]["size"], "counts": p["segmentation"]["counts"].encode()}
                   if isinstance(p["segmentation"]["counts"], str) else p["segmentation"] for p in mine]
        ious = mask_util.iou(dt_rles, gt_rles, [0] * len(gt_rles))
        pairs = sorted(((ious[i, j], i, j) for i in range(len(mine)) for j in range(len(gt_rles)) if ious[i, j] > 0.5),
                       reverse=True)
        used_p, used_g = set(), set()
        for _, i, j in pairs:
            if i in used_p or j in used_g:
                continue
            used_p.add(i)
            used_g.add(j)
            if cat_to_label[mine[i]["category_id"]] == gt_labels[j]:
                tp += 1
            else:
                fp += 1
                fn += 1
        fp += len(mine) - len(used_p)
        fn += len(gt_rles) - len(used_g)
    return 2 * tp / max(2 * tp + fp + fn, 1)


def test_run_val_writes_files_and_f1_matches_independent_protocol(trained_run, tmp_path):  # noqa: F811
    from dfineseg.val import run_val

    out = tmp_path / "val"
    metrics = run_val(weights=trained_run.checkpoint, data=trained_run.data_yaml, conf=trained_run.conf, out=out,
                      verbose=False)
    for name in ("metrics.json", "predictions.json", "images.json"):
        assert (out / name).is_file(), name
    f1 = metrics["mask"]["f1"]
    assert f1 >= 0.3  # a real model, not two zeros
    assert f1 == pytest.approx(_independent_mask_f1(out / "predictions.json", trained_run.data_yaml, trained_run.conf),
                               abs=1e-9)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["mask"]["f1"] == pytest.approx(f1)
    # Training-time validation of best.pt went through the same code: same numbers.
    assert trained_run.metrics["mask_map50_95"] == pytest.approx(metrics["mask"]["map50_95"], abs=1e-6)


def test_predict_hook_accepts_any_callable(trained_run, tmp_path):  # noqa: F811
    """Exported backends plug in as `predict(images) -> list[Detections]`; here: the torch predictor
    wrapped, plus a predictor that finds nothing (F1 must drop to 0)."""
    from dfineseg.infer.backends.torch import model_predictor
    from dfineseg.infer.detections import Detections
    from dfineseg.model.model_file import load_model_file
    from dfineseg.val import run_val

    opened = load_model_file(trained_run.checkpoint)
    calls = {"images": 0}
    inner = model_predictor(opened.model, opened.deploy_info(), conf=0.01)

    def counting(images):
        calls["images"] += len(images)
        return inner(images)

    direct = run_val(weights=trained_run.checkpoint, data=trained_run.data_yaml, conf=trained_run.conf,
                     out=tmp_path / "a", verbose=False)
    hooked = run_val(predict=counting, data=trained_run.data_yaml, conf=trained_run.conf, task="segment",
                     out=tmp_path / "b", verbose=False)
    assert calls["images"] == direct["images"] > 0
    assert hooked["mask"]["f1"] == pytest.approx(direct["mask"]["f1"])

    def nothing(images):
        return [Detections.empty(im.shape[:2], with_masks=True) for im in images]

    empty = run_val(predict=nothing, data=trained_run.data_yaml, task="segment", out=tmp_path / "c", verbose=False)
    assert empty["mask"]["f1"] == 0.0 and empty["mask"]["fn"] == direct["instances"]


def test_cli_val_and_clear_error_for_a_non_checkpoint(trained_run, tmp_path):  # noqa: F811
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "dfineseg.cli", "val", f"weights={trained_run.checkpoint}",
         f"data={trained_run.data_yaml}", f"conf={trained_run.conf}", f"out={out}"],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "mask" in res.stdout and (out / "predictions.json").is_file()

    bogus = tmp_path / "notes.pt"
    bogus.write_text("hello")
    res = subprocess.run(
        [sys.executable, "-m", "dfineseg.cli", "val", f"weights={bogus}", f"data={trained_run.data_yaml}"],
        capture_output=True, text=True,
    )
    assert res.returncode == 2 and "notes.pt" in res.stderr and "Traceback" not in res.stderr
