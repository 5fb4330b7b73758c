"""Batched adapters that run the PyTorch reference (nld_trt.attention and nld_trt.kv.attend, the executor's
own paged write and gather) on the kernels' inputs, so tests compare the kernels against the code the
executor runs."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from nld_trt.attention import attention, chunk_attention_mask
from nld_trt.kv.attend import gather, quantize as quantize_rows, read_index

from ..dtypes import FP8_MAX


def quantize(x: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """What a cache of `dtype` stores for x: FP8 holds clamp(x * (1 / scale)) rounded to e4m3."""
    if dtype != torch.float8_e4m3fn:
        return x
    return (x.float() * (1.0 / (scale or 1.0))).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Quantized cache values (FP8, or e4m3 values held wider) back to fp32; unquantized ones pass through."""
    return x.float() * scale if scale is not None else x


def _one_layer(k_cache: torch.Tensor, v_cache: torch.Tensor) -> SimpleNamespace:
    """A one-layer paged cache as nld_trt.kv.attend reads it (its layout's page size, no scales)."""
    return SimpleNamespace(k=[k_cache], v=[v_cache], layout=SimpleNamespace(page_size=k_cache.shape[1], scales=None))


def reference_attention(
    q, k_cache, v_cache, tables, committed, chunk_lens, block, scale, k_scale=None, v_scale=None
) -> torch.Tensor:
    """nld_trt.attention.attention over each row's first max(L + n) positions, read through its page table
    as the reference executor reads them, with its chunk mask. A quantized cache is dequantized to fp32 and
    q is upcast, so the reference runs in fp32."""
    keys = int((committed + chunk_lens).max())
    k, v = gather(_one_layer(k_cache, v_cache), 0, *read_index(tables.long(), torch.arange(keys), k_cache.shape[1]),
                  q.dtype)
    k, v = dequantize(k, k_scale), dequantize(v, v_scale)
    if k.dtype != q.dtype:
        q, k, v = q.float(), k.float(), v.float()
    mask = chunk_attention_mask(committed.long(), chunk_lens.long(), block.bool(), q.shape[2], keys)
    return attention(q, k, v, mask, scale)


def reference_write_kv(k, v, k_cache, v_cache, tables, committed, chunk_lens, k_quant=None, v_quant=None) -> None:
    """The executor's paged write (nld_trt.kv.attend.PagedStep) on a one-layer cache, in place: chunk token t
    of row b at offset (L + t) % P of page tables[b, (L + t) // P]; with k_quant / v_quant (a quantized
    layout) the stored value is e4m3(clamp(x * quant))."""
    t, p = k.shape[2], k_cache.shape[1]
    rows, cols = (torch.arange(t)[None, :] < chunk_lens.long()[:, None]).nonzero(as_tuple=True)
    pos = committed.long()[rows] + cols
    pages, offsets = tables.long()[rows, pos // p], pos % p
    ks, vs = k[rows, :, cols], v[rows, :, cols]
    if k_quant is not None:
        ks, vs = quantize_rows(ks, k_quant, k_cache.dtype), quantize_rows(vs, v_quant, v_cache.dtype)
    k_cache[pages, offsets] = ks
    v_cache[pages, offsets] = vs
