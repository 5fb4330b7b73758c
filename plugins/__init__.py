"""TensorRT plugins and their Triton kernels."""
