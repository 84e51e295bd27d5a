"""Predictor: metadata, thresholds, image conversions and every kind of bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_predictor_standin import (
    IMGSZ,
    assert_same_detections,
    convert_openvino,
    export_onnx,
    metadata,
    scene,
)

from dfineseg.infer.backends import ModelFileError, PredictorError
from dfineseg.infer.errors import UserError
from dfineseg.infer.io import ImageReadError
from dfineseg.infer.predictor import Predictor


@pytest.fixture(scope="module")
def onnx_predictor(standin_files):
    return Predictor.load(standin_files.onnx)


# ------------------------------------------------------------------------------------------ metadata
def test_defaults_come_from_the_model_metadata(standin_files, tmp_path):
    path = export_onnx(tmp_path / "conf.onnx", meta=metadata(conf=0.9))
    strict = Predictor.load(path)
    assert strict.conf == pytest.approx(0.9)
    loose = Predictor.load(path, conf=0.3)
    img = scene(4)
    n_strict, n_loose = len(strict.predict(img)), len(loose.predict(img))
    assert n_loose > n_strict  # the stored threshold is really applied, and conf= overrides it
    assert len(strict.predict(img, conf=0.3)) == n_loose  # and so does a per-call conf


def test_letterbox_metadata_is_used(standin_files, tmp_path):
    from dfineseg.infer.postprocess import postprocess
    from dfineseg.infer.preprocess import preprocess

    path = export_onnx(tmp_path / "lb.onnx", meta=metadata(resize="letterbox"))
    predictor = Predictor.load(path)
    img = scene(5, h=40, w=160)
    batch, metas = preprocess([img], IMGSZ, "letterbox")
    expected = postprocess(predictor.backend.forward(batch), metas, conf=0.5)[0]
    assert_same_detections(predictor.predict(img), expected, box_iou_min=0.999, mask_iou_min=0.999)


def test_files_of_metadata_schema_1_with_mask_logits_still_load_and_give_the_same_detections(standin_files, tmp_path):
    """Files exported before masks left the graph (one mask_logits output) run on both runtimes and give
    exactly the masks of today's factored outputs."""
    legacy_onnx = export_onnx(tmp_path / "legacy.onnx", legacy=True)
    (tmp_path / "ov").mkdir()
    legacy_ov = convert_openvino(legacy_onnx, tmp_path / "ov" / "model.xml")
    today = Predictor.load(standin_files.onnx)
    assert "mask_embed" in today.backend.output_names
    for path in (legacy_onnx, legacy_ov):
        old = Predictor.load(path)
        assert "mask_logits" in old.backend.output_names and old.info.schema == 1
        for seed in (3, 6):
            img = scene(seed)
            ref = today.predict(img)
            assert ref.has_masks and len(ref)
            assert_same_detections(old.predict(img), ref, box_iou_min=0.999, mask_iou_min=1.0)


def test_segment_file_without_mask_outputs_is_refused(tmp_path):
    path = export_onnx(tmp_path / "nomasks.onnx", task="detect", meta=metadata(task="segment"))
    with pytest.raises(ModelFileError, match="no mask outputs") as err:
        Predictor.load(path)
    assert str(path) in str(err.value) and "dfineseg export" in str(err.value)


def test_newer_schema_is_refused_with_a_clear_message(tmp_path):
    path = export_onnx(tmp_path / "future.onnx", meta=metadata(schema=3))
    with pytest.raises(ModelFileError, match="newer dfineseg") as err:
        Predictor.load(path)
    assert str(path) in str(err.value)


def test_model_without_metadata_is_refused(tmp_path):
    path = export_onnx(tmp_path / "bare.onnx", meta={})
    with pytest.raises(ModelFileError, match="without metadata") as err:
        Predictor.load(path)
    assert str(path) in str(err.value)


def test_foreign_onnx_graph_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 64, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "resnet.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelFileError, match="not a dfineseg model"):
        Predictor.load(path)


# ------------------------------------------------------------------------------------------ bad model files
def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found") as err:
        Predictor.load(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(err.value)


def test_unknown_model_format(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(ModelFileError, match=r"unknown model format '\.h5'.*\.onnx"):
        Predictor.load(path)


def test_corrupt_onnx_file(standin_files, tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(standin_files.onnx.read_bytes()[:300])
    with pytest.raises(ModelFileError, match="ONNX Runtime cannot load") as err:
        Predictor.load(path)
    assert str(path) in str(err.value)


def test_corrupt_or_incomplete_openvino_ir(standin_files, tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_text(standin_files.openvino.read_text()[:500])
    (tmp_path / "model.bin").write_bytes(standin_files.openvino.with_suffix(".bin").read_bytes())
    with pytest.raises(ModelFileError, match="OpenVINO cannot read"):
        Predictor.load(xml)
    lonely = tmp_path / "solo" / "model.xml"
    lonely.parent.mkdir()
    lonely.write_text(standin_files.openvino.read_text())
    with pytest.raises(ModelFileError, match="model.bin is missing"):
        Predictor.load(lonely)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="folder with no .xml"):
        Predictor.load(empty)


def test_corrupt_checkpoint(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "best.pt"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ModelFileError) as err:
        Predictor.load(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------ images
def test_gray_rgba_and_16bit_arrays_give_the_rgb_result(onnx_predictor):
    gray = scene(6)[:, :, 1]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    ref = onnx_predictor.predict(rgb)
    assert len(ref) > 0
    rgba = np.dstack([rgb, np.full(gray.shape, 7, np.uint8)])
    sixteen = rgb.astype(np.uint16) * 257
    for variant in (gray, gray[:, :, None], rgba, sixteen):
        assert_same_detections(onnx_predictor.predict(variant), ref, box_iou_min=0.999, mask_iou_min=0.999)


def test_image_files_gray_rgba_16bit(onnx_predictor, tmp_path):
    rgb = scene(7)
    ref = onnx_predictor.predict(rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    ref_gray = onnx_predictor.predict(np.repeat(gray[:, :, None], 3, axis=2))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb[:, :, ::-1], np.full(gray.shape, 128, np.uint8)]))
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[:, :, ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    assert_same_detections(onnx_predictor.predict(tmp_path / "rgba.png"), ref, 0.999, 0.999)
    assert_same_detections(onnx_predictor.predict(str(tmp_path / "deep.png")), ref, 0.999, 0.999)
    assert_same_detections(onnx_predictor.predict(tmp_path / "gray.png"), ref_gray, 0.999, 0.999)


def test_unreadable_image_names_the_file(onnx_predictor, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageReadError, match="photo.jpg"):
        onnx_predictor.predict(bad)
    with pytest.raises(ImageReadError, match="missing.png"):
        onnx_predictor.predict(tmp_path / "missing.png")
    assert issubclass(ImageReadError, UserError)


def test_bad_arrays_are_refused_clearly(onnx_predictor):
    with pytest.raises(PredictorError, match="0..1"):
        onnx_predictor.predict(np.full((32, 32, 3), 200.0, np.float32))
    with pytest.raises(PredictorError, match="4-D batch"):
        onnx_predictor.predict(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(PredictorError, match="shape"):
        onnx_predictor.predict(np.zeros((32, 32, 5), np.uint8))
    with pytest.raises(PredictorError, match="conf must lie in 0..1"):
        onnx_predictor.predict(scene(0), conf=1.5)


def test_zero_detections_is_an_empty_result(onnx_predictor):
    det = onnx_predictor.predict(np.zeros((50, 70, 3), np.uint8))
    assert len(det) == 0 and det.image_shape == (50, 70)
    assert det.has_masks and det.full_masks().shape == (0, 50, 70)
    assert det.to_coco(1, [3, 7, 11]) == [] and det.to_yolo_lines() == []


def test_8k_image(onnx_predictor):
    h, w = 4320, 7680
    small = scene(8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    det = onnx_predictor.predict(big)
    ref = onnx_predictor.predict(small)
    assert det.image_shape == (h, w) and len(det) == len(ref) > 0
    # boxes scale with the image; masks stay compact crops, never full 8K planes
    np.testing.assert_allclose(det.boxes / [w / 160, h / 120, w / 160, h / 120], ref.boxes, atol=1.0)
    assert sum(m.size for m in det.masks) < len(det) * h * w
    rle = det.rle()[0]
    assert list(rle["size"]) == [h, w]


def test_predict_list_and_paths_keep_order(onnx_predictor, tmp_path):
    imgs = [scene(i) for i in range(3)]
    paths = []
    for i, img in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), img[:, :, ::-1])
        paths.append(p)
    from_arrays = onnx_predictor.predict(imgs)
    from_paths = onnx_predictor.predict(paths)
    assert isinstance(from_arrays, list) and len(from_arrays) == 3
    for a, b in zip(from_arrays, from_paths):
        assert_same_detections(a, b, 0.999, 0.999)
    assert onnx_predictor.predict([]) == []
