"""From a trained (and maybe compressed) net to one verified, self-contained ONNX file.

Modules, in the order a model goes through them:
  from_run.py     a run directory back into its config, data, and best checkpoint
  onnx_export.py  torch net -> ONNX (torchscript when trusted, else dynamo; dynamic batch, pinned opset)
  graphs.py       the deployable graph: raw-row table preprocessing in front, class names behind, metadata
  feeds.py        raw rows (a DataFrame or an array) -> onnxruntime inputs; torch-free, shared with predict
  checks.py       onnx.checker, onnxruntime sessions, parity with PyTorch
  measure.py      metrics, size, parameters, latency of each variant
  report.py       report.json, report.md, the trade-off plot and TensorBoard

Importing this package is cheap (no torch): `kiln predict` uses feeds.py.
"""
