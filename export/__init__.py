"""Export a checkpoint to ONNX, OpenVINO (FP32/FP16/INT8) and TensorRT, each parity-checked against PyTorch.

Entry point: `dfineseg.export.api.export_model(weights, cfg) -> {artefact: path}` (or `export(cfg)`, which
reads `cfg.export.weights`). The formats and their artefacts: `formats` (the registry; `context` is what
each build step receives). Per format: `onnx_export` (+ `fp16`), `openvino_export` (+ `openvino_rewrites`),
`int8`, `tensorrt_export`. Checking and publishing: `parity` (+ `parity_data`, `parity_checks`,
`tolerances`), `publish`, `meta`. Importing this package imports nothing heavy.
"""
