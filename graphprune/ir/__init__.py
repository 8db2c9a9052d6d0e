"""The model: ONNX in and out, shapes, external data."""
