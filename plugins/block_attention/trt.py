"""TensorRT plugin `nld::block_attention` (ahead-of-time form: the Triton kernel's PTX is embedded in the
engine, no Python at serve time). A thin wrapper: shapes, signatures and launch logic are in launch.py.

Inputs: q [B, Hq, T, D] (FP32/FP16/BF16), k_cache, v_cache [S, Hkv, M, D] (same types or FP8), slots,
committed, chunk_lens, block [B] INT32; attributes scale, k_scale, v_scale (baked into the PTX); output
like q. The chunk's K/V must be in the cache already (the cache update is not part of this plugin).
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
from .. import _trt
from ..dtypes import from_trt
from ..shapes import contiguous_strides
from . import launch as L

PLUGIN = "nld::block_attention"
_done = False


def register() -> None:
    """Register the plugin with TensorRT's plugin registry (idempotent)."""
    global _done
    if _done:
        return
    _, trtp = _trt.tensorrt_plugin()
    from typing import List, Tuple, Union

    @trtp.register(PLUGIN)
    def _desc(
        q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, slots: trtp.TensorDesc,
        committed: trtp.TensorDesc, chunk_lens: trtp.TensorDesc, block: trtp.TensorDesc,
        scale: float, k_scale: float, v_scale: float,
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN)
    def _autotune(
        q, k_cache, v_cache, slots, committed, chunk_lens, block, outputs
    ) -> List[trtp.AutoTuneCombination]:
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 7], "FP32|FP16|BF16")
        combo.pos([1, 2], "FP32|FP16|BF16|FP8")
        combo.pos([3, 4, 5, 6], "INT32")
        combo.tactics(list(L.attention_tactics("bf16")))  # same tactic ids for every dtype
        return [combo]

    @trtp.aot_impl(PLUGIN)
    def _aot(
        q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, slots: trtp.TensorDesc,
        committed: trtp.TensorDesc, chunk_lens: trtp.TensorDesc, block: trtp.TensorDesc,
        scale: float, k_scale: float, v_scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        cfg = L.attention_tactics(from_trt(q.dtype))[tactic]
        qs, ks = q.shape_expr, k_cache.shape_expr
        head_dim = _trt.constant(qs[3], "head_dim")
        spec = L.attention_spec(
            from_trt(q.dtype), from_trt(k_cache.dtype), head_dim, cfg,
            specialize=L.attention_scales(scale, k_scale, v_scale),
        )
        q_strides, k_strides = contiguous_strides(qs), contiguous_strides(ks)
        extras = L.attention_ints(qs, ks, q_strides, k_strides, k_strides, q_strides)
        grid = L.attention_grid(qs[0], ks[1], qs[2], qs[1] // ks[1], cfg)
        return _trt.aot_result(trtp, spec, grid, extras)

    _done = True
