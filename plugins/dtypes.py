"""Element-type names shared by the torch entry points, the AOT signatures and the TensorRT wrappers.

Triton signatures spell pointer element types as "fp32", "bf16", "fp16", "fp8e4nv", "i32"; the same names
are derived from torch dtypes (tests, torch path) and from TensorRT DataType enum names (plugins).
"""

from __future__ import annotations

from typing import Any

import torch

FLOAT_TYPES = ("fp32", "bf16", "fp16")
KV_TYPES = FLOAT_TYPES + ("fp8e4nv",)

_FROM_TORCH = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int32: "i32",
}
_FROM_TRT = {"FLOAT": "fp32", "BF16": "bf16", "HALF": "fp16", "FP8": "fp8e4nv", "INT32": "i32"}

FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def from_torch(dtype: torch.dtype) -> str:
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}") from None


def from_trt(dtype: Any) -> str:
    """Name of a tensorrt.DataType (matched by enum name, so this runs without TensorRT)."""
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    try:
        return _FROM_TRT[name]
    except KeyError:
        raise TypeError(f"unsupported TensorRT dtype {dtype}") from None


def to_trt(trt: Any, name: str) -> Any:
    """The tensorrt.DataType for a name (trt is the imported tensorrt module)."""
    for trt_name, ours in _FROM_TRT.items():
        if ours == name:
            return getattr(trt.DataType, trt_name)
    raise TypeError(f"no TensorRT dtype for {name}")
