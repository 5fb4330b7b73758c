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
    slots: torch.Tensor,
    committed: torch.Tensor,
    chunk_lens: torch.Tensor,
    block: torch.Tensor,
    scale: float,
    k_scale: float | None = None,
    v_scale: float | None = None,
    config: L.AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention of a chunk against each row's cache slot: q [B, Hq, T, D], caches [S, Hkv, M, D].

    The chunk's own K/V must already be in the cache at L..L+n-1 (see `write_kv`). Row b reads slot
    slots[b]; block[b] selects the bidirectional pattern. FP8 (e4m3) caches hold value / scale: pass the
    per-tensor k_scale / v_scale. Padding queries (j >= chunk_lens[b]) output zeros. Returns q's dtype.
    """
    per_sequence = [slots.numel(), committed.numel(), chunk_lens.numel(), block.numel()]
    L.check_shapes(q.shape, k_cache.shape, v_cache.shape, per_sequence)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError("k_cache and v_cache must have the same dtype")
    q, k_cache, v_cache = map(last_dim_contiguous, (q, k_cache, v_cache))
    interpret = interpreting()
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    q_type = from_torch(q.dtype)
    cfg = config or L.attention_config(t * (hq // hkv), q_type, interpret)
    spec = L.attention_spec(q_type, from_torch(k_cache.dtype), d, cfg, upcast=interpret)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ints = L.attention_ints(q.shape, k_cache.shape, q.stride(), k_cache.stride(), v_cache.stride(), out.stride())
    values = dict(zip(L.ATTENTION_INTS, ints))
    values.update(L.attention_scales(scale, k_scale or 1.0, v_scale or 1.0))
    values.update(
        Q=q, K=k_cache, V=v_cache, O=out,
        SLOTS=int32_on(slots, q.device), COMMITTED=int32_on(committed, q.device),
        CHUNK_LENS=int32_on(chunk_lens, q.device), IS_BLOCK=int32_on(block, q.device),
    )
    launch(spec, L.attention_grid(b, hkv, t, hq // hkv, cfg), values, q.device.type)
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    committed: torch.Tensor,
    chunk_lens: torch.Tensor,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> None:
    """Write the chunk's k, v [B, Hkv, T, D] into the caches at L..L+n-1 of each row's slot, in place.

    Padding tokens (t >= chunk_lens[b]) and positions past the cache end are skipped. An FP8 cache stores
    clamp(x * (1 / scale), -448, 448) rounded to e4m3 (nearest, ties to even).
    """
    same_heads = (k.shape[1], k.shape[3]) == (k_cache.shape[1], k_cache.shape[3])
    if k.shape != v.shape or k_cache.shape != v_cache.shape or not same_heads:
        raise ValueError(f"expected k, v [B,Hkv,T,D] and caches [S,Hkv,M,D], got {k.shape}, {k_cache.shape}")
    if k.dtype != v.dtype or k_cache.dtype != v_cache.dtype:
        raise TypeError("k/v and k_cache/v_cache must have matching dtypes")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous in the head dim (they are written in place)")
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    b, hkv, t, d = k.shape
    block_t = L.write_block_t(t)
    spec = L.write_spec(from_torch(k.dtype), from_torch(k_cache.dtype), d, block_t)
    ints = L.write_ints(k.shape, k_cache.shape, k.stride(), v.stride(), k_cache.stride(), v_cache.stride())
    values = dict(zip(L.WRITE_INTS, ints))
    values.update(L.write_scales(k_scale or 1.0, v_scale or 1.0))
    values.update(
        K_NEW=k, V_NEW=v, K_CACHE=k_cache, V_CACHE=v_cache,
        SLOTS=int32_on(slots, k.device), COMMITTED=int32_on(committed, k.device),
        CHUNK_LENS=int32_on(chunk_lens, k.device),
    )
    launch(spec, L.write_grid(b, hkv, t, block_t), values, k.device.type)
