"""The PyTorch backend: a checkpoint file opened by Predictor.load gives DeployModel's detections."""

from __future__ import annotations

import numpy as np
import pytest
from test_predictor_standin import assert_matching_detections, scene

torch = pytest.importorskip("torch")

from dfineseg.infer.backends import BackendUnavailableError, PredictorError  # noqa: E402
from dfineseg.infer.predictor import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from dfineseg.config import Config
    from dfineseg.model.dfine import build_model
    from dfineseg.train.checkpoint import capture_rng, save_checkpoint

    cfg = Config()
    cfg.model.size = "tiny"
    cfg.model.num_queries = 12
    cfg.model.num_denoising = 0
    cfg.data.imgsz = (64, 96)
    cfg.data.resize = "letterbox"
    cfg.eval.conf = 0.0  # an untrained model: keep every query so the comparison has something to compare
    cfg.export.topk = 7
    torch.manual_seed(0)
    model = build_model(cfg.model, 2).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(
        {"config": cfg.to_dict(), "names": ["cat", "dog"], "category_ids": [17, 18], "model": model.state_dict(),
         "ema": None, "ema_updates": 0, "optimizer": {}, "scheduler": {}, "scaler": {}, "epoch": 0, "step": 0,
         "rng": capture_rng(), "metrics": {}, "best_fitness": 0.0},
        path,
    )
    return path, model


def test_checkpoint_predictions_equal_deploy_model(tiny_checkpoint):
    from dfineseg.infer.postprocess import postprocess
    from dfineseg.infer.preprocess import preprocess
    from dfineseg.model.dfine import DeployModel

    path, model = tiny_checkpoint
    predictor = Predictor.load(path)
    info = predictor.info
    assert predictor.runtime.backend == "torch" and predictor.runtime.device == "cpu"
    assert info.names == ["cat", "dog"] and info.category_ids == [17, 18]
    assert tuple(info.imgsz) == (64, 96) and info.resize == "letterbox" and info.topk == 7 and info.task == "segment"
    images = [scene(1), scene(2, h=50, w=200)]
    got = predictor.predict(images)
    batch, metas = preprocess(images, (64, 96), "letterbox")
    with torch.no_grad():
        outs = DeployModel(model, topk=7)(torch.from_numpy(batch))
    names = ("scores", "labels", "boxes", "mask_logits")
    expected = postprocess({n: o.numpy() for n, o in zip(names, outs)}, metas, conf=0.0)
    assert all(len(d) == 7 for d in got)
    for g, e in zip(got, expected):
        # untrained queries tie on score, so their order may differ: match them instead (all 7 must pair up)
        assert assert_matching_detections(g, e, conf=0.0, box_iou_min=0.999, mask_iou_min=0.999, margin=-1.0) == 7
    raw = predictor.backend.forward(batch)
    assert set(raw) == set(names) and raw["labels"].dtype == np.int64 and raw["mask_logits"].shape == (2, 7, 16, 24)


def test_torch_backend_device_errors(tiny_checkpoint):
    path, _ = tiny_checkpoint
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            Predictor.load(path, device="cuda")
        with pytest.raises(PredictorError, match="needs device=cuda"):
            Predictor.load(path, precision="fp16")
    with pytest.raises(PredictorError, match="device 'tpu'"):
        Predictor.load(path, device="tpu")
