"""Engines: the model as an ONNX graph (verified by ONNX Runtime on CPU) and TensorRT plans built from it."""
