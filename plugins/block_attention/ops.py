"""Torch entry points of the block-attention kernels (compiled on CUDA, or interpreted: plugins.interpret)."""

from __future__ import annotations

import torch

from ..dtypes import from_torch
from ..interpret import interpreting
from ..runtime import int32_on, last_dim_contiguous, launch
from . import launch as L


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    committed: torch.Tensor,
    chunk_lens: torch.Tensor,
    block: torch.Tensor,
    scale: float,
    k_scale: float | None = None,
    v_scale: float | None = None,
    config: L.AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention of a chunk against each row's pages: q [B, Hq, T, D], caches [pages, P, Hkv, D], page tables
    [B, W] (position p of row b at offset p % P of page tables[b, p // P]).

    The chunk's own K/V must already be in the cache at L..L+n-1 (see `write_kv`). block[b] selects the
    bidirectional pattern. A quantized cache (FP8, or a wider one holding e4m3 values) is read back times the
    per-tensor k_scale / v_scale. Padding queries (j >= chunk_lens[b]) output zeros. Returns q's dtype.
    """
    per_sequence = [committed.numel(), chunk_lens.numel(), block.numel()]
    L.check_shapes(q.shape, k_cache.shape, v_cache.shape, tables.shape, per_sequence)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError("k_cache and v_cache must have the same dtype")
    q, k_cache, v_cache = map(last_dim_contiguous, (q, k_cache, v_cache))
    tables = int32_on(tables, q.device)
    interpret = interpreting()
    b, hq, t, d = q.shape
    hkv = k_cache.shape[2]
    q_type = from_torch(q.dtype)
    cfg = config or L.attention_config(t * (hq // hkv), q_type, interpret)
    spec = L.attention_spec(q_type, from_torch(k_cache.dtype), d, k_cache.shape[1], cfg, upcast=interpret)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ints = L.attention_ints(q.shape, k_cache.shape, tables.shape, q.stride(), k_cache.stride(), v_cache.stride(),
                            out.stride(), tables.stride())
    values = dict(zip(L.ATTENTION_INTS, ints))
    values.update(L.attention_scales(scale, k_scale or 1.0, v_scale or 1.0))
    values.update(
        Q=q, K=k_cache, V=v_cache, O=out, TABLES=tables,
        COMMITTED=int32_on(committed, q.device), CHUNK_LENS=int32_on(chunk_lens, q.device),
        IS_BLOCK=int32_on(block, q.device),
    )
    launch(spec, L.attention_grid(b, hkv, t, hq // hkv, cfg), values, q.device.type)
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    committed: torch.Tensor,
    chunk_lens: torch.Tensor,
    k_quant: float | None = None,
    v_quant: float | None = None,
) -> None:
    """Write the chunk's k, v [B, Hkv, T, D] into the paged caches at L..L+n-1 of each row, in place.

    Padding tokens (t >= chunk_lens[b]) and positions past what the page table covers are skipped. With
    k_quant / v_quant (a quantized layout; an FP8 cache needs them) the cache stores
    e4m3(clamp(x * quant, -448, 448)) (nearest, ties to even), exactly, in its dtype.
    """
    if k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected k, v [B,Hkv,T,D] and caches [pages,P,Hkv,D], got {k.shape}, {k_cache.shape}")
    L.check_write_shapes(k.shape, k_cache.shape, tables.shape)
    if k.dtype != v.dtype or k_cache.dtype != v_cache.dtype:
        raise TypeError("k/v and k_cache/v_cache must have matching dtypes")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous in the head dim (they are written in place)")
    quantize = k_quant is not None or v_quant is not None
    if k_cache.dtype == torch.float8_e4m3fn and not quantize:
        raise TypeError("an FP8 cache stores quantized values: pass k_quant and v_quant")
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    tables = int32_on(tables, k.device)
    b, hkv, t, d = k.shape
    block_t = L.write_block_t(t)
    spec = L.write_spec(from_torch(k.dtype), from_torch(k_cache.dtype), d, k_cache.shape[1], block_t,
                        quantize=quantize)
    ints = L.write_ints(k.shape, k_cache.shape, tables.shape, k.stride(), v.stride(), k_cache.stride(),
                        v_cache.stride(), tables.stride())
    values = dict(zip(L.WRITE_INTS, ints))
    values.update(L.write_scales(k_quant or 1.0, v_quant or 1.0))
    values.update(
        K_NEW=k, V_NEW=v, K_IN=k_cache, V_IN=v_cache, K_CACHE=k_cache, V_CACHE=v_cache, TABLES=tables,
        COMMITTED=int32_on(committed, k.device), CHUNK_LENS=int32_on(chunk_lens, k.device),
    )
    launch(spec, L.write_grid(b, hkv, t, block_t), values, k.device.type)
