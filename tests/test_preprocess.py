"""The one resize: input conversion, letterbox/stretch geometry, and the exact box round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dfineseg.infer.preprocess import (
    LETTERBOX_PAD_VALUE,
    boxes_to_network,
    boxes_to_original,
    letterbox,
    preprocess,
    resize_image,
    stretch,
    to_rgb_uint8,
)


def test_to_rgb_uint8_gray_rgba_bgr_16bit_float():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_rgb_uint8(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    assert (to_rgb_uint8(gray[..., None]) == out).all()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 10, 30, 255
    assert to_rgb_uint8(rgba)[0, 0].tolist() == [10, 0, 30]
    assert to_rgb_uint8(rgba, assume_bgr=True)[0, 0].tolist() == [30, 0, 10]

    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV order
    assert to_rgb_uint8(bgr, assume_bgr=True)[0, 0].tolist() == [0, 0, 200]
    assert to_rgb_uint8(bgr)[0, 0].tolist() == [200, 0, 0]

    u16 = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128.5 * 256 -> 128
    assert to_rgb_uint8(u16)[0, :, 0].tolist() == [0, 128, 255]

    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert to_rgb_uint8(f)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((2, 2, 3), 255.0, np.float32), "0..1"),
        (np.zeros((2, 2, 3), np.int32), "dtype"),
        (np.zeros((2, 2, 2), np.uint8), "shape"),
        (np.zeros((0, 2, 3), np.uint8), "empty"),
    ],
)
def test_to_rgb_uint8_refuses_ambiguous_input(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_uint8(bad)


def test_letterbox_geometry_and_padding():
    img = np.full((1080, 1920, 3), 7, np.uint8)
    out, meta = letterbox(img, 640)
    assert out.shape == (640, 640, 3)
    assert (meta.scale_x, meta.scale_y, meta.pad_x, meta.pad_y) == (1 / 3, 1 / 3, 0, 140)
    assert (out[:140] == LETTERBOX_PAD_VALUE).all() and (out[500:] == LETTERBOX_PAD_VALUE).all()
    assert (out[140:500] == 7).all()
    assert meta.content_hw == (360, 640)

    # Non-square network input, tall image: horizontal padding.
    out, meta = letterbox(np.zeros((500, 100, 3), np.uint8), (320, 640))
    assert out.shape == (320, 640, 3)
    assert meta.pad_y == 0 and meta.pad_x == (640 - 64) // 2


def test_stretch_meta():
    out, meta = stretch(np.zeros((100, 300, 3), np.uint8), (64, 96))
    assert out.shape == (64, 96, 3)
    assert (meta.scale_x, meta.scale_y, meta.pad_x, meta.pad_y) == (96 / 300, 64 / 100, 0, 0)
    with pytest.raises(ValueError, match="resize must be one of"):
        resize_image(out, 64, "crop")


def test_preprocess_batch_layout_and_channel_order():
    red = np.zeros((30, 50, 3), np.uint8)
    red[..., 0] = 255
    gray16 = np.full((40, 20), 65535, np.uint16)
    batch, metas = preprocess([red, gray16], (32, 64), "letterbox")
    assert batch.shape == (2, 3, 32, 64) and batch.dtype == np.float32
    assert batch.min() >= 0 and batch.max() <= 1
    c = metas[0]
    content = batch[0, :, c.pad_y : c.pad_y + c.content_hw[0], c.pad_x : c.pad_x + c.content_hw[1]]
    assert np.allclose(content[0], 1.0) and np.allclose(content[1:], 0.0)
    assert np.allclose(batch[0, 1, 0, 0], LETTERBOX_PAD_VALUE / 255) or metas[0].pad_y == 0
    assert metas[1].orig_shape == (40, 20)
    # BGR input is flipped once, here.
    batch_bgr, _ = preprocess([red], (32, 64), "stretch", assume_bgr=True)
    assert np.allclose(batch_bgr[0, 2], 1.0) and np.allclose(batch_bgr[0, 0], 0.0)


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("orig, imgsz", [((1080, 1920), (640, 640)), ((333, 517), (384, 640)), ((641, 77), (640, 640))])
def test_box_round_trip_is_exact(resize, orig, imgsz):
    rng = np.random.default_rng(0)
    _, meta = resize_image(np.zeros(orig + (3,), np.uint8), imgsz, resize)
    h0, w0 = orig
    xy = rng.uniform(0, 1, (200, 2)) * [w0, h0]
    wh = rng.uniform(0, 1, (200, 2)) * [w0, h0] * 0.5
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w0, h0])], axis=1)
    net = boxes_to_network(boxes, meta)
    back = boxes_to_original(net, meta, clip=False)
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-9)
    # And from the network side (clipping off: padding-area coordinates must map back too).
    net2 = rng.uniform(0, 1, (200, 4))
    np.testing.assert_allclose(boxes_to_network(boxes_to_original(net2, meta, clip=False), meta), net2, rtol=0, atol=1e-12)


def test_meta_matches_the_pixels():
    """The mapping describes where content really lands: a rectangle drawn in the original appears
    in the network image where boxes_to_network says (within the one pixel that resizing blurs)."""
    img = np.zeros((300, 500, 3), np.uint8)
    img[60:180, 100:400] = 255
    out, meta = letterbox(img, (256, 320))
    ys, xs = np.nonzero(out[..., 0] > 127)
    expected = boxes_to_network(np.array([[100, 60, 400, 180]]), meta)[0] * [320, 256, 320, 256]
    found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_allclose(found, expected, atol=1.0)


def test_boxes_to_original_clips_to_image():
    _, meta = letterbox(np.zeros((100, 200, 3), np.uint8), 64)
    b = boxes_to_original(np.array([[-0.1, 0.0, 1.2, 1.0]]), meta)
    assert b[0, 0] == 0 and b[0, 2] == 200 and b[0, 1] == 0 and b[0, 3] == 100


# ---------------------------------------------------------------------------------------- model metadata
# (infer/metadata.py: the resize mode and input size a model file declares are what preprocess applies)
def test_metadata_round_trip_and_schema_guard():
    from dfineseg.infer.metadata import MetadataError, ModelInfo, decode_metadata, encode_metadata

    info = ModelInfo(names=["a", "b"], category_ids=[3, 9], imgsz=(384, 640), resize="letterbox", conf=0.4,
                     topk=50, task="detect", precision="int8", version="0.1.0")
    flat = info.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert flat["dfineseg_schema"] == "2" and flat["resize"] == "letterbox" and flat["imgsz"] == "[384, 640]"
    assert decode_metadata(flat) == info
    assert encode_metadata({"names": ["x"]})["dfineseg_version"]  # filled in

    with pytest.raises(MetadataError, match=r"newer dfineseg.*schema 3.*upgrade"):
        decode_metadata({**flat, "dfineseg_schema": "3"}, source="m.onnx")
    with pytest.raises(MetadataError, match=r"m.onnx.*missing keys \['names'\]"):
        decode_metadata({k: v for k, v in flat.items() if k != "names"}, source="m.onnx")
    with pytest.raises(MetadataError, match="'imgsz'"):
        decode_metadata({**flat, "imgsz": "[640]"})
    with pytest.raises(MetadataError, match="'names' is not valid JSON"):
        decode_metadata({**flat, "names": "[a, b]"})
    with pytest.raises(MetadataError, match="'category_ids'"):
        decode_metadata({**flat, "category_ids": "[1]"})


def test_deploy_settings_come_from_the_config_unless_the_caller_chooses():
    """The one derivation export, the PyTorch backend and validation share: the caller's value wins,
    otherwise the training config's (data.imgsz, data.resize, eval.conf, export.topk)."""
    pytest.importorskip("torch")
    from dfineseg.config import build_config
    from dfineseg.infer.metadata import decode_metadata
    from dfineseg.model.model_file import deploy_info

    cfg = build_config({"data": {"imgsz": [320, 480], "resize": "letterbox"}, "eval": {"conf": 0.3},
                        "export": {"topk": 50}, "model": {"task": "detect"}}, "test")
    info = deploy_info(cfg, ["a", "b", "c"], [1, 2, 5])
    assert (info.imgsz, info.resize, info.conf, info.topk, info.task) == ((320, 480), "letterbox", 0.3, 50, "detect")
    chosen = deploy_info(cfg, ["a", "b", "c"], imgsz=(640, 640), conf=0.6, topk=10, precision="fp16")
    assert (chosen.imgsz, chosen.conf, chosen.topk, chosen.category_ids, chosen.precision) == (
        (640, 640), 0.6, 10, [0, 1, 2], "fp16")
    decoded = decode_metadata(chosen.to_metadata())
    assert decoded.version and dataclasses.replace(decoded, version="") == chosen  # the package version filled in
