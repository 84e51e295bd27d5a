"""Export a checkpoint to ONNX, OpenVINO (FP32/FP16/INT8) and TensorRT, each parity-checked against PyTorch.

Entry point: `dfineseg.export.api.export_model(weights, cfg) -> {artefact: path}` (or `export(cfg)`, which
reads `cfg.export.weights`). Submodules: `onnx_export`, `fp16`, `gather_sampler`, `openvino_export`,
`int8`, `tensorrt_export`, `parity`, `meta`. Importing this package imports nothing heavy.
"""

from dfineseg._callable import make_module_callable

# `dfineseg.export(cfg)` calls `dfineseg.api.export`, like `dfineseg.train(cfg)` and `dfineseg.val(cfg)`.
make_module_callable(__name__, "export")
