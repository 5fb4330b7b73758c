"""Shape arithmetic shared by the launch logic; works on ints and on TensorRT's symbolic shape
expressions alike (only *, + and // are used)."""

from __future__ import annotations

from typing import Any, Sequence


def contiguous_strides(shape: Sequence[Any]) -> list[Any]:
    """Row-major element strides of `shape`."""
    strides: list[Any] = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return strides


def cdiv(a: Any, b: int) -> Any:
    return (a + b - 1) // b
