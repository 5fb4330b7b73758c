"""Batched adapters that run the PyTorch reference (nld_trt.attention, nld_trt.model.CacheStep) on the
slot-cache inputs of the kernels, so tests compare kernels against the code the executor runs."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from nld_trt.attention import attention, chunk_attention_mask
from nld_trt.model import CacheStep

from ..dtypes import FP8_MAX


def quantize(x: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """What a cache of `dtype` stores for x: FP8 holds clamp(x * (1 / scale)) rounded to e4m3."""
    if dtype != torch.float8_e4m3fn:
        return x
    return (x.float() * (1.0 / (scale or 1.0))).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """FP8 cache values back to fp32 (other dtypes pass through)."""
    return x.float() * (scale or 1.0) if x.dtype == torch.float8_e4m3fn else x


def reference_attention(
    q, k_cache, v_cache, slots, committed, chunk_lens, block, scale, k_scale=None, v_scale=None
) -> torch.Tensor:
    """nld_trt.attention.attention over each row's slot, with the chunk mask of the reference executor.
    An FP8 cache is dequantized to fp32 and q is upcast, so the reference runs in fp32."""
    keys = int((committed + chunk_lens).max())
    idx = slots.long()
    k = dequantize(k_cache[idx, :, :keys], k_scale)
    v = dequantize(v_cache[idx, :, :keys], v_scale)
    if k.dtype != q.dtype:
        q = q.float()
    mask = chunk_attention_mask(committed.long(), chunk_lens.long(), block.bool(), q.shape[2], keys)
    return attention(q, k, v, mask, scale)


def reference_write_kv(k, v, k_cache, v_cache, slots, committed, chunk_lens, k_scale=None, v_scale=None) -> None:
    """CacheStep.update (the executor's cache write) on a one-layer cache, in place."""
    t = k.shape[2]
    rows, cols = (torch.arange(t)[None, :] < chunk_lens.long()[:, None]).nonzero(as_tuple=True)
    positions = committed.long()[rows] + cols
    cache = SimpleNamespace(k=[k_cache], v=[v_cache])
    keys = int((committed + chunk_lens).max())
    step = CacheStep(cache, slots.long(), committed.long(), chunk_lens.long(), block=None, mask=None, write_rows=rows,
                     write_cols=cols, write_pos=positions, keys=keys, contiguous_from=None)
    step.update(0, quantize(k, k_scale, k_cache.dtype), quantize(v, v_scale, v_cache.dtype))
