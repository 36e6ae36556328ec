"""Exporting the model for deployment (ONNX). Builds on `retinanet.model`."""
