"""Every CPU backend gives the same Detections as PyTorch, and reports what really runs."""

from __future__ import annotations

import numpy as np
import pytest
from test_predictor_standin import (
    CATEGORY_IDS,
    IMGSZ,
    NAMES,
    assert_same_detections,
    scene,
    torch_reference,
)

from dfineseg.infer.backends import ModelFileError, PredictorError, detect_backend, load_backend
from dfineseg.infer.predictor import Predictor

IMAGES = [scene(s) for s in range(4)] + [scene(9, h=90, w=200)]


@pytest.fixture(scope="module")
def reference():
    return torch_reference().predict(IMAGES)


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "openvino_dir"])
def test_backend_matches_torch(standin_files, reference, fmt):
    path = {"onnx": standin_files.onnx, "openvino": standin_files.openvino,
            "openvino_dir": standin_files.openvino.parent}[fmt]
    options = {"precision": "f32"} if fmt.startswith("openvino") else {}
    with Predictor.load(path, **options) as predictor:
        assert predictor.names == NAMES and predictor.category_ids == CATEGORY_IDS
        assert tuple(predictor.info.imgsz) == IMGSZ and predictor.task == "segment"
        results = predictor.predict(IMAGES)
    assert sum(len(d) for d in reference) > 0
    for got, ref in zip(results, reference):
        assert_same_detections(got, ref)


def test_onnxruntime_reports_the_provider_really_used(standin_files):
    be = load_backend(standin_files.onnx, threads=1)
    assert be.runtime.backend == "onnxruntime"
    assert be.runtime.device == "CPUExecutionProvider"
    assert be.runtime.extra["providers"] == be.session.get_providers()
    assert be.runtime.batch is None and be.runtime.input_hw == IMGSZ
    assert be.info.names == NAMES and be.info.category_ids == CATEGORY_IDS  # decoded metadata
    with pytest.raises(PredictorError, match="unknown backend option.*precison"):
        load_backend(standin_files.onnx, precison="f32")


def test_onnxruntime_refuses_a_gpu_it_does_not_have(standin_files):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA for ONNX Runtime")
    from dfineseg.infer.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        load_backend(standin_files.onnx, device="cuda")


def test_openvino_records_the_precision_it_computes_in(standin_files):
    import openvino as ov

    be32 = load_backend(standin_files.openvino, precision="f32", threads=1, performance="latency")
    assert be32.runtime.precision == "f32"
    assert set(be32.runtime.extra["op_precisions"]) <= {"f32"}  # no integer operation in a float model
    assert be32.runtime.extra["performance_hint"].upper().endswith("LATENCY")
    assert int(be32.runtime.extra["threads"]) == 1
    # f16 is not honoured by most x86 CPUs: whatever is asked, the report is what the device computes in
    be16 = load_backend(standin_files.openvino, precision="f16")
    truth = ov.Core().compile_model(str(standin_files.openvino), "CPU", {"INFERENCE_PRECISION_HINT": "f16"})
    assert be16.runtime.precision == truth.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    with pytest.raises(PredictorError, match="precision 'fp64'"):
        load_backend(standin_files.openvino, precision="fp64")


def test_openvino_throughput_hint_and_async_stream_keep_order(standin_files):
    be = load_backend(standin_files.openvino, precision="f32", performance="throughput", num_requests=3)
    assert be.runtime.extra["performance_hint"].upper().endswith("THROUGHPUT")
    from dfineseg.infer.preprocess import preprocess

    batches = [preprocess([img], IMGSZ)[0] for img in IMAGES]
    streamed = list(be.forward_stream((b, i) for i, b in enumerate(batches)))
    assert [ctx for _, ctx in streamed] == list(range(len(batches)))
    for (out, i) in streamed:
        sync = be.forward(batches[i])
        for name in sync:
            np.testing.assert_array_equal(out[name], sync[name])


def test_openvino_stream_runs_no_python_on_openvino_threads_and_stops_cleanly(standin_files, monkeypatch):
    """A Python completion callback on OpenVINO's stream thread deadlocked CI: destroying the compiled model
    (holding the GIL) joined a thread that waited for the GIL. Results must be read on the caller's thread;
    a stream left early or broken by a bad batch must leave the backend usable and close without hanging."""
    import threading

    from dfineseg.infer.backends.openvino import OpenVinoBackend
    from dfineseg.infer.preprocess import preprocess

    readers = []
    collect = OpenVinoBackend._collect

    def recording_collect(self, request):
        readers.append(threading.get_ident())
        return collect(self, request)

    monkeypatch.setattr(OpenVinoBackend, "_collect", recording_collect)
    be = load_backend(standin_files.openvino, precision="f32", num_requests=2)
    batches = [preprocess([img], IMGSZ)[0] for img in IMAGES]
    assert len(list(be.forward_stream((b, i) for i, b in enumerate(batches)))) == len(batches)
    assert readers and set(readers) == {threading.get_ident()}

    stream = be.forward_stream((b, i) for i, b in enumerate(batches))
    assert next(stream)[1] == 0
    stream.close()  # the caller stops early: the queued inferences are waited for, nothing leaks
    wrong = np.zeros((1, 3, IMGSZ[0] + 1, IMGSZ[1]), np.float32)
    with pytest.raises(PredictorError, match="input batch has shape"):
        list(be.forward_stream([(batches[0], 0), (batches[1], 1), (wrong, 2)]))
    np.testing.assert_array_equal(be.forward(batches[0])["boxes"],
                                  next(be.forward_stream([(batches[0], 0)]))[0]["boxes"])
    be.close()


def test_dynamic_batch_equals_one_by_one(standin_files):
    predictor = Predictor.load(standin_files.onnx, batch_size=3)
    assert predictor.chunk_size(len(IMAGES)) == 3
    batched = predictor.predict(IMAGES)
    for img, det in zip(IMAGES, batched):
        assert_same_detections(det, predictor.predict(img), box_iou_min=0.999, mask_iou_min=0.999)


def test_fixed_batch_model_pads_the_last_chunk(standin_files, reference):
    predictor = Predictor.load(standin_files.onnx_batch2)
    assert predictor.runtime.batch == 2 and predictor.chunk_size(5) == 2
    results = predictor.predict(IMAGES)  # 5 images -> 2 + 2 + (1 + padding)
    assert len(results) == len(IMAGES)
    for got, ref in zip(results, reference):
        assert_same_detections(got, ref)
    with pytest.raises(PredictorError, match="batch of 3"):
        predictor.backend.forward(np.zeros((3, 3, *IMGSZ), np.float32))


def test_detect_model_has_no_masks(standin_files):
    predictor = Predictor.load(standin_files.onnx_detect)
    assert predictor.task == "detect"
    ref = torch_reference(task="detect").predict(IMAGES)
    for got, r in zip(predictor.predict(IMAGES), ref):
        assert not got.has_masks
        assert_same_detections(got, r)


def test_backend_is_chosen_by_file(standin_files, tmp_path):
    assert detect_backend(standin_files.onnx) == "onnxruntime"
    assert detect_backend(standin_files.openvino) == "openvino"
    assert detect_backend(standin_files.openvino.parent) == "openvino"
    assert detect_backend(standin_files.openvino.with_suffix(".bin")) == "openvino"
    for name, backend in [("best.pt", "torch"), ("model.engine", "tensorrt")]:
        (tmp_path / name).write_bytes(b"x")
        assert detect_backend(tmp_path / name) == backend


def test_tensorrt_without_gpu_says_so(tmp_path):
    from dfineseg.infer.errors import BackendUnavailableError

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="TensorRT engines need an NVIDIA GPU"):
            Predictor.load(engine)
    else:
        with pytest.raises((BackendUnavailableError, ModelFileError)):
            Predictor.load(engine)


def test_openvino_reads_metadata_written_by_the_exporter(tmp_path):
    """The OpenVINO exporter's own writer stores the map (an ONNX file without metadata_props to inherit)."""
    import json

    from test_predictor_standin import export_onnx, metadata

    from dfineseg.export.openvino_export import export_openvino

    bare = export_onnx(tmp_path / "bare.onnx", meta={})
    meta = metadata(conf=0.42)
    meta["names"] = json.dumps(["x", "y", "z"])
    export_openvino(bare, tmp_path / "ir", compress_fp16=False, metadata=meta)
    predictor = Predictor.load(tmp_path / "ir")
    assert predictor.names == ["x", "y", "z"] and predictor.conf == pytest.approx(0.42)
    assert predictor.category_ids == CATEGORY_IDS


def test_parity_runs_an_openvino_artefact_under_the_device_default_precision_too(standin_files, tmp_path):
    """Parity pins f32; `infer` and `bench` keep the device's default (bf16 on AVX512-BF16/AMX CPUs), where a
    graph can break alone (session 13's gather sampler crashed only there). The smoke check runs it, reports
    what it computed in, and fails an artefact that cannot run there, with the runtime's own words."""
    import shutil

    from dfineseg.export.context import open_backend
    from dfineseg.export.parity_checks import check_device_default
    from dfineseg.export.parity_data import ParityData, Reference
    from dfineseg.infer.detections import Detections

    images = [scene(s) for s in range(3)]
    data = ParityData(images, None, "generated", IMGSZ, "stretch", "detect", 0.3)
    ref = Reference({}, [], None, [Detections.empty(img.shape[:2]) for img in images], None, 0.0)
    pinned = open_backend(standin_files.openvino, precision="f32")[2]
    check = check_device_default(lambda: open_backend(standin_files.openvino), pinned, data, ref)
    default_precision = load_backend(standin_files.openvino).runtime.precision
    assert check.passed and check.detail["precision"] == default_precision
    if default_precision == pinned["precision"]:  # a CPU without bf16: nothing new to run
        assert not check.judged and "checked above" in check.detail["note"]
    else:
        assert check.judged and check.detail["images"] == 3 and check.detail["torch_detections"] == 0
        assert check.detail["detections"] >= 0
    # Judged as run whatever the CPU when the pinned precision differs from the default (here: told so).
    ran = check_device_default(lambda: open_backend(standin_files.openvino), {"precision": "other"}, data, ref)
    assert ran.passed and ran.judged and ran.detail["images"] == 3
    # An artefact that does not open or run at the default is a failure naming the error and the way out.
    broken = tmp_path / "broken"
    shutil.copytree(standin_files.openvino.parent, broken)
    (broken / standin_files.openvino.with_suffix(".bin").name).write_bytes(b"\0" * 16)
    failed = check_device_default(lambda: open_backend(broken / standin_files.openvino.name), pinned, data, ref)
    assert not failed.passed and failed.judged and "precision=f32" in failed.detail["fix"]
    assert failed.detail["error"]
