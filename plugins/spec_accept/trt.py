"""TensorRT plugins `nld::spec_accept` and `nld::dlm_select` (ahead-of-time form). Thin wrappers: shapes,
signatures and launch logic are in launch.py.

nld::spec_accept: draft [B, T] INT32, logits [B, T, V] FP32/FP16/BF16 -> accepted [B], next_token [B] INT32.
nld::dlm_select: logits [B, T, V], masked [B, T] INT32, fill_all [B] INT32, attribute threshold (baked into
the PTX) -> tokens [B, T] INT32, confidences [B, T] FP32, fill [B, T] INT32.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
from .. import _trt
from ..dtypes import from_trt, to_trt
from ..shapes import contiguous_strides
from . import launch as L

ACCEPT_PLUGIN = "nld::spec_accept"
SELECT_PLUGIN = "nld::dlm_select"
_done = False


def register() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent)."""
    global _done
    if _done:
        return
    trt, trtp = _trt.tensorrt_plugin()
    from typing import List, Tuple, Union

    def descs(outputs):
        return tuple(trtp.from_shape_expr(shape, dtype=to_trt(trt, dtype)) for shape, dtype in outputs)

    @trtp.register(ACCEPT_PLUGIN)
    def _accept_desc(draft: trtp.TensorDesc, logits: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return descs(L.accept_outputs(logits.shape_expr[0]))

    @trtp.autotune(ACCEPT_PLUGIN)
    def _accept_autotune(draft, logits, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("INT32, FP32|FP16|BF16, INT32, INT32")]

    @trtp.aot_impl(ACCEPT_PLUGIN)
    def _accept_aot(
        draft: trtp.TensorDesc, logits: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        ls = logits.shape_expr
        spec = L.accept_spec(from_trt(logits.dtype), L.TRT_CONFIG)
        extras = L.accept_ints(ls, contiguous_strides(draft.shape_expr), contiguous_strides(ls))
        return _trt.aot_result(trtp, spec, L.grid(ls[0]), extras)

    @trtp.register(SELECT_PLUGIN)
    def _select_desc(
        logits: trtp.TensorDesc, masked: trtp.TensorDesc, fill_all: trtp.TensorDesc, threshold: float
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return descs(L.select_outputs(logits.shape_expr[0], logits.shape_expr[1]))

    @trtp.autotune(SELECT_PLUGIN)
    def _select_autotune(logits, masked, fill_all, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT32, INT32, INT32, FP32, INT32")]

    @trtp.aot_impl(SELECT_PLUGIN)
    def _select_aot(
        logits: trtp.TensorDesc, masked: trtp.TensorDesc, fill_all: trtp.TensorDesc, threshold: float,
        outputs: Tuple[trtp.TensorDesc],
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        ls = logits.shape_expr
        spec = L.select_spec(from_trt(logits.dtype), L.TRT_CONFIG, specialize={"threshold": threshold})
        extras = L.select_ints(ls, contiguous_strides(ls), contiguous_strides(masked.shape_expr))
        return _trt.aot_result(trtp, spec, L.grid(ls[0]), extras)

    _done = True
