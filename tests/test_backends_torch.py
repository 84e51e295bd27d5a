"""The PyTorch backend: a checkpoint file opened by Predictor.load gives DeployModel's detections."""

from __future__ import annotations

import numpy as np
import pytest
from test_predictor_standin import scene

torch = pytest.importorskip("torch")

from dfineseg.infer.backends import BackendUnavailableError, PredictorError  # noqa: E402
from dfineseg.infer.predictor import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from dfineseg.config import Config
    from dfineseg.model.checkpoint import save_checkpoint
    from dfineseg.model.dfine import build_model
    from dfineseg.train.rng_state import capture_rng

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


def _by_hand(model, image: np.ndarray, in_hw: tuple[int, int], topk: int):
    """The checkpoint's answer computed without dfineseg's pre/post-processing or DeployModel: a letterbox
    written out here, the eval forward's raw outputs, top-K by hand, boxes mapped back by hand, and masks
    upsampled with torch's bilinear resize (align_corners=False) to the network input, then un-letterboxed."""
    import cv2

    in_h, in_w = in_hw
    h0, w0 = image.shape[:2]
    r = min(in_h / h0, in_w / w0)
    new_w, new_h = round(w0 * r), round(h0 * r)
    px, py = (in_w - new_w) // 2, (in_h - new_h) // 2
    canvas = np.full((in_h, in_w, 3), 114, np.uint8)
    canvas[py:py + new_h, px:px + new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(canvas.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
    with torch.no_grad():
        out = model(x)
    prob = out["pred_logits"][0].sigmoid()
    score, label = prob.max(-1)
    order = torch.argsort(score, descending=True)[:topk]
    cx, cy, bw, bh = out["pred_boxes"][0][order].unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).numpy() * [in_w, in_h, in_w, in_h]
    sx, sy = new_w / w0, new_h / h0
    xyxy = (xyxy - [px, py, px, py]) / [sx, sy, sx, sy]
    xyxy = np.clip(xyxy, 0, [w0, h0, w0, h0])
    logits = torch.nn.functional.interpolate(out["pred_masks"][0][order][None], size=(in_h, in_w), mode="bilinear",
                                             align_corners=False)[0].numpy()
    masks = [cv2.resize((m[py:py + new_h, px:px + new_w] > 0).astype(np.uint8), (w0, h0),
                        interpolation=cv2.INTER_NEAREST).astype(bool) for m in logits]
    return score[order].numpy(), label[order].numpy(), xyxy.astype(np.float32), masks


def test_checkpoint_predictions_equal_the_model_computed_by_hand(tiny_checkpoint):
    path, model = tiny_checkpoint
    predictor = Predictor.load(path)
    info = predictor.info
    assert predictor.runtime.backend == "torch" and predictor.runtime.device == "cpu"
    assert info.names == ["cat", "dog"] and info.category_ids == [17, 18]
    assert tuple(info.imgsz) == (64, 96) and info.resize == "letterbox" and info.topk == 7 and info.task == "segment"
    images = [scene(1), scene(2, h=50, w=200)]
    got = predictor.predict(images)
    assert all(len(d) == 7 for d in got)
    for image, dets in zip(images, got):
        scores, labels, boxes, masks = _by_hand(model.eval(), image, (64, 96), topk=7)
        full = dets.full_masks()
        # untrained queries nearly tie on score, so their order may differ: pair each by-hand query with
        # the detection of the same label and closest box (all 7 must pair up, one to one)
        unused = set(range(len(dets)))
        for s, lab, box, mask in zip(scores, labels, boxes, masks):
            candidates = [i for i in unused if dets.labels[i] == lab and abs(dets.scores[i] - s) < 1e-5]
            assert candidates, f"no detection with label {lab} and score {s:.6f} in {dets.scores}"
            best = min(candidates, key=lambda i: float(np.abs(dets.boxes[i] - box).max()))
            assert np.abs(dets.boxes[best] - box).max() < 1e-3, (dets.boxes[best], box)
            # the product resizes logits straight to original pixels inside the box; the hand version goes
            # through the network size first, so borders may differ by a pixel: compare inside the box
            x0, y0 = np.floor(box[:2]).astype(int)
            x1, y1 = np.ceil(box[2:]).astype(int)
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            want, have = mask & inside, full[best] & inside
            if want.sum() >= 20:  # a degenerate box of an untrained query has no mask worth comparing
                iou = (want & have).sum() / max((want | have).sum(), 1)
                assert iou >= 0.8, f"mask IoU {iou:.3f}"
            unused.remove(best)
    batch = np.zeros((2, 3, 64, 96), np.float32)
    raw = predictor.backend.forward(batch)
    assert set(raw) == {"scores", "labels", "boxes", "mask_features", "mask_embed"}
    channels = raw["mask_features"].shape[-1]
    assert raw["labels"].dtype == np.int64 and raw["mask_features"].shape == (2, 16, 24, channels)
    assert raw["mask_embed"].shape == (2, 7, channels)


def test_torch_backend_device_errors(tiny_checkpoint):
    path, _ = tiny_checkpoint
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            Predictor.load(path, device="cuda")
        with pytest.raises(PredictorError, match="needs device=cuda"):
            Predictor.load(path, precision="fp16")
    with pytest.raises(PredictorError, match="device 'tpu'"):
        Predictor.load(path, device="tpu")
