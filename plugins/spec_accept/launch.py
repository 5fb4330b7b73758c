"""Shape, dtype and launch logic of the selection kernels (spec_accept, dlm_select), as plain Python.

One program per sequence (grid (B,)); it walks T in tiles of BLOCK_T rows and V in tiles of BLOCK_V.
Shapes may be ints or TensorRT shape expressions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..spec import KernelSpec, aot_signature
from ..dtypes import FLOAT_TYPES

MODULE = "nld_trt.plugins.spec_accept.kernels"

ACCEPT_INPUTS = ("DRAFT", "LOGITS")
ACCEPT_INTS = ("T", "V", "stride_db", "stride_lb", "stride_lt")
ACCEPT_OUTPUTS = {"ACCEPTED": "i32", "NEXT_TOKEN": "i32"}  # [B] each

SELECT_INPUTS = ("LOGITS", "MASKED", "FILL_ALL")
SELECT_INTS = ("T", "V", "stride_lb", "stride_lt", "stride_mb")
SELECT_FLOATS = ("threshold",)
SELECT_OUTPUTS = {"TOKENS": "i32", "CONF": "fp32", "FILL": "i32"}  # [B, T] each

CONSTEXPRS = ("BLOCK_T", "BLOCK_V")


@dataclass(frozen=True)
class SelectConfig:
    block_t: int  # chunk positions per tile
    block_v: int  # vocabulary entries per tile
    num_warps: int = 8


# 8 x 1024 tiles at 8 warps: 32 values per thread, so one program keeps enough loads in flight to stream
# its sequence's logits (wider row tiles multiply the argmax code: 32 x 256 compiles to 5x the
# instructions). The interpreter prefers fewer, larger numpy steps.
TRT_CONFIG = SelectConfig(block_t=8, block_v=1024, num_warps=8)
INTERPRET_CONFIG = SelectConfig(block_t=32, block_v=1024, num_warps=4)


def select_config(interpret: bool) -> SelectConfig:
    return INTERPRET_CONFIG if interpret else TRT_CONFIG


def check_shapes(logits: Sequence[int], per_position: Sequence[Sequence[int]], per_sequence: Sequence[int]) -> None:
    """logits [B, T, V]; per-position tensors [B, T]; per-sequence tensors [B]."""
    if len(logits) != 3:
        raise ValueError(f"expected logits [B, T, V], got {list(logits)}")
    for shape in per_position:
        if tuple(shape) != tuple(logits[:2]):
            raise ValueError(f"expected [B, T] = {list(logits[:2])}, got {list(shape)}")
    if any(n != logits[0] for n in per_sequence):
        raise ValueError(f"per-sequence tensors must have B={logits[0]} entries, got {list(per_sequence)}")


def grid(batch: Any) -> tuple[Any]:
    return (batch,)


def accept_outputs(batch: Any) -> list[tuple[tuple[Any, ...], str]]:
    """(shape, dtype) of accepted count [B] and next token [B]."""
    return [((batch,), dtype) for dtype in ACCEPT_OUTPUTS.values()]


def select_outputs(batch: Any, chunk: Any) -> list[tuple[tuple[Any, ...], str]]:
    """(shape, dtype) of tokens, confidences and fill flags, each [B, T]."""
    return [((batch, chunk), dtype) for dtype in SELECT_OUTPUTS.values()]


def accept_ints(logits_shape, draft_strides, logits_strides) -> list[Any]:
    return [logits_shape[1], logits_shape[2], draft_strides[0], logits_strides[0], logits_strides[1]]


def select_ints(logits_shape, logits_strides, masked_strides) -> list[Any]:
    return [logits_shape[1], logits_shape[2], logits_strides[0], logits_strides[1], masked_strides[0]]


def _constexprs(cfg: SelectConfig) -> dict[str, int]:
    return {"BLOCK_T": cfg.block_t, "BLOCK_V": cfg.block_v}


def accept_spec(logits: str, cfg: SelectConfig) -> KernelSpec:
    if logits not in FLOAT_TYPES:
        raise TypeError(f"unsupported logits dtype {logits}")
    sig = aot_signature(dict(zip(ACCEPT_INPUTS, ("i32", logits))), ACCEPT_INTS, (), ACCEPT_OUTPUTS, CONSTEXPRS)
    return KernelSpec(MODULE, "spec_accept_kernel", sig, _constexprs(cfg), cfg.num_warps, num_stages=2)


def select_spec(logits: str, cfg: SelectConfig, *, specialize: dict[str, float] | None = None) -> KernelSpec:
    """`specialize={"threshold": tau}` bakes the threshold in (TensorRT passes no float scalars)."""
    if logits not in FLOAT_TYPES:
        raise TypeError(f"unsupported logits dtype {logits}")
    specialize = specialize or {}
    inputs = dict(zip(SELECT_INPUTS, (logits, "i32", "i32")))
    sig = aot_signature(inputs, SELECT_INTS, SELECT_FLOATS, SELECT_OUTPUTS, CONSTEXPRS, specialize)
    constexprs = dict(specialize) | _constexprs(cfg)
    return KernelSpec(MODULE, "dlm_select_kernel", sig, constexprs, cfg.num_warps, num_stages=2)
