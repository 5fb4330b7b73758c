"""TensorRT plugins `nld::write_kv` and `nld::block_attention` (ahead-of-time form: the Triton kernels' PTX is
embedded in the engine, no Python at serve time). Thin wrappers: shapes, signatures and launch logic are in
launch.py.

nld::write_kv: k, v [B, Hkv, T, D] (FP32/FP16/BF16), k_cache, v_cache [pages, P, Hkv, D] (same types or FP8),
page_table [B, W], committed, chunk_lens [B] INT32; attributes k_quant, v_quant (float, baked into the PTX)
and quantize (int: a quantized layout stores e4m3(clamp(x * quant))); outputs the two caches, aliased to the
cache inputs (`TensorDesc.aliased()`): the chunk's K/V are written in place, nothing is copied.

nld::block_attention: q [B, Hq, T, D], k_cache, v_cache (the write's outputs), page_table, committed,
chunk_lens, block [B] INT32; attributes scale, k_scale, v_scale (the dequantization scales, baked into the
PTX); output like q.

An engine with aliased plugin I/O needs the builder's preview feature ALIASED_PLUGIN_IO_10_03
(nld_trt/engine/trt_build.py turns it on).
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
from .. import _trt
from ..dtypes import from_trt
from ..shapes import contiguous_strides
from . import launch as L

PLUGIN = "nld::block_attention"
WRITE_PLUGIN = "nld::write_kv"
_done = False


def combination(trtp, floats: list[int], caches: list[int], ints: list[int], tactics=()):
    """The I/O types a plugin takes: activations (q, k, v, outputs) in a float type, caches also FP8, metadata
    INT32 (positions count inputs, then outputs)."""
    combo = trtp.AutoTuneCombination()
    combo.pos(floats, "FP32|FP16|BF16")
    combo.pos(caches, "FP32|FP16|BF16|FP8")
    combo.pos(ints, "INT32")
    if tactics:
        combo.tactics(list(tactics))
    return combo


def register() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent)."""
    global _done
    if _done:
        return
    _, trtp = _trt.tensorrt_plugin()
    from typing import List, Tuple, Union

    @trtp.register(WRITE_PLUGIN)
    def _write_desc(
        k: trtp.TensorDesc, v: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
        page_table: trtp.TensorDesc, committed: trtp.TensorDesc, chunk_lens: trtp.TensorDesc,
        k_quant: float, v_quant: float, quantize: int,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return k_cache.aliased(), v_cache.aliased()

    @trtp.autotune(WRITE_PLUGIN)
    def _write_autotune(
        k, v, k_cache, v_cache, page_table, committed, chunk_lens, outputs
    ) -> List[trtp.AutoTuneCombination]:
        return [combination(trtp, floats=[0, 1], caches=[2, 3, 7, 8], ints=[4, 5, 6])]

    @trtp.aot_impl(WRITE_PLUGIN)
    def _write_aot(
        k: trtp.TensorDesc, v: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
        page_table: trtp.TensorDesc, committed: trtp.TensorDesc, chunk_lens: trtp.TensorDesc,
        k_quant: float, v_quant: float, quantize: int, outputs: Tuple[trtp.TensorDesc],
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        ks, cs, ts = k.shape_expr, k_cache.shape_expr, page_table.shape_expr
        head_dim = _trt.constant(ks[3], "head_dim")
        page_size = _trt.constant(cs[1], "page size")
        chunk = _trt.constant(ks[2], "chunk length") if getattr(ks[2], "is_constant", False) else 32
        block_t = L.write_block_t(chunk)
        spec = L.write_spec(from_trt(k.dtype), from_trt(k_cache.dtype), head_dim, page_size, block_t,
                            quantize=bool(quantize), specialize=L.write_scales(k_quant, v_quant))
        k_strides, c_strides = contiguous_strides(ks), contiguous_strides(cs)
        extras = L.write_ints(ks, cs, ts, k_strides, k_strides, c_strides, c_strides, contiguous_strides(ts))
        return _trt.aot_result(trtp, spec, L.write_grid(ks[0], ks[1], ks[2], block_t), extras)

    @trtp.register(PLUGIN)
    def _desc(
        q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, page_table: trtp.TensorDesc,
        committed: trtp.TensorDesc, chunk_lens: trtp.TensorDesc, block: trtp.TensorDesc,
        scale: float, k_scale: float, v_scale: float,
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN)
    def _autotune(
        q, k_cache, v_cache, page_table, committed, chunk_lens, block, outputs
    ) -> List[trtp.AutoTuneCombination]:
        # the same tactic ids for every dtype
        return [combination(trtp, floats=[0, 7], caches=[1, 2], ints=[3, 4, 5, 6], tactics=L.attention_tactics("bf16"))]

    @trtp.aot_impl(PLUGIN)
    def _aot(
        q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, page_table: trtp.TensorDesc,
        committed: trtp.TensorDesc, chunk_lens: trtp.TensorDesc, block: trtp.TensorDesc,
        scale: float, k_scale: float, v_scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        cfg = L.attention_tactics(from_trt(q.dtype))[tactic]
        qs, ks, ts = q.shape_expr, k_cache.shape_expr, page_table.shape_expr
        head_dim = _trt.constant(qs[3], "head_dim")
        page_size = _trt.constant(ks[1], "page size")
        spec = L.attention_spec(
            from_trt(q.dtype), from_trt(k_cache.dtype), head_dim, page_size, cfg,
            specialize=L.attention_scales(scale, k_scale, v_scale),
        )
        q_strides, k_strides = contiguous_strides(qs), contiguous_strides(ks)
        extras = L.attention_ints(qs, ks, ts, q_strides, k_strides, k_strides, q_strides, contiguous_strides(ts))
        grid = L.attention_grid(qs[0], ks[2], qs[2], qs[1] // ks[2], cfg)
        return _trt.aot_result(trtp, spec, grid, extras)

    _done = True
