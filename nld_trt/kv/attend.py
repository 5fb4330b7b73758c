"""Attention against the paged cache: the tensors of a `KVLayout` and the per-pass step objects every layer
calls (`step.attend(layer, q, k, v, scale)`: write the chunk's K/V at committed..committed+n-1 of each
row's pages, then attend).

- `PagedStep`: the reference (exact shapes, computed on the host). The write is an index_put at (page,
  offset) of every real chunk token; attention gathers each row's first `keys` positions (the longest row's
  L + n) through its page table (whole pages, one index_select) into a [Hkv, keys, D] context and runs SDPA
  under the chunk mask (nld_trt.attention).
- `StaticPagedStep`: shapes fixed by (batch bucket, chunk length) and every length, page and mask on the
  device, for compiled passes and CUDA graphs (nld_trt/executors/static_pass.py): padding writes go to the
  scratch page, and the number of positions read is the pass's one dynamic size.
- With `kernels`, both run the Triton KV-write and block-attention kernels (nld_trt.plugins), which read the
  page tables and lengths on the device.
A quantized layout (FP8 KV cache) quantizes on write and dequantizes on read, in all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import attention, chunk_attention_mask
from ..errors import NLDError
from .layout import FP8_MAX, KVLayout


class PagedCache:
    """Every layer's K and V pages of a layout, on one device."""

    def __init__(self, layout: KVLayout, device: torch.device | str) -> None:
        if layout.dtype == torch.float8_e4m3fn and layout.scales is None:
            raise NLDError("an FP8 KV cache needs the checkpoint's k/v scales")
        self.layout = layout
        # zeros, not empty: masked keys still enter SDPA's products (0 * NaN would poison a row)
        self.k = [torch.zeros(layout.shape, dtype=layout.dtype, device=device) for _ in range(layout.layers)]
        self.v = [torch.zeros(layout.shape, dtype=layout.dtype, device=device) for _ in range(layout.layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def quantize(x: torch.Tensor, quant: float, dtype: torch.dtype) -> torch.Tensor:
    """What a quantized cache of `dtype` stores for x: e4m3(clamp(x * quant)), exact in wider dtypes."""
    y = (x.float() * quant).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y if dtype == torch.float8_e4m3fn else y.to(dtype)


def dequantize(x: torch.Tensor, dequant: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * dequant).to(dtype)


def store(cache: PagedCache, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows as the cache stores them (quantized for an FP8 layout)."""
    layout = cache.layout
    if layout.scales is None:
        return k, v
    s = layout.scales[layer]
    return quantize(k, s.k_quant, layout.dtype), quantize(v, s.v_quant, layout.dtype)


def read_index(tables: torch.Tensor, positions: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where positions [K] (0..K-1) of every row live: pages [B, K] (through `tables` [B, W]) and offsets [K]."""
    return tables.gather(1, (positions // page_size).expand(tables.shape[0], -1)), positions % page_size


def _dequantized(cache: PagedCache, layer: int, k: torch.Tensor, v: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scales = cache.layout.scales
    if scales is None:
        return k, v
    s = scales[layer]
    return dequantize(k, s.k_dequant, dtype), dequantize(v, s.v_dequant, dtype)


def gather(cache: PagedCache, layer: int, pages: torch.Tensor, offsets: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions `read_index` located, as contexts [B, Hkv, K, D] in `dtype`. Indexed by position, so K is
    the only size (a compiled pass keeps it dynamic)."""

    def read(pool: torch.Tensor) -> torch.Tensor:
        return pool[pages, offsets].transpose(1, 2)  # [B, K, Hkv, D] -> [B, Hkv, K, D]

    return _dequantized(cache, layer, read(cache.k[layer]), read(cache.v[layer]), dtype)


def gather_pages(cache: PagedCache, layer: int, page_ids: torch.Tensor, rows: int, keys: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first `keys` positions as contexts [B, Hkv, keys, D], reading whole pages (`page_ids`: the
    rows' first n pages, flattened [B * n]): one index_select per tensor (pages are position-major, so the
    pages of a row are its positions in order: a view, no second copy), the eager path's faster read of the
    same values."""
    layout = cache.layout
    n = page_ids.shape[0] // rows

    def read(pool: torch.Tensor) -> torch.Tensor:
        x = pool.index_select(0, page_ids).view(rows, n * layout.page_size, layout.kv_heads, layout.head_dim)
        return x.transpose(1, 2)[:, :, :keys]

    return _dequantized(cache, layer, read(cache.k[layer]), read(cache.v[layer]), dtype)


def kernel_attend(cache: PagedCache, layer: int, q, k, v, tables, committed, chunk_lens, block, scale: float):
    """Write k, v [B, Hkv, T, D] at committed..committed+n-1 of each row's pages and attend q [B, Hq, T, D]
    with the fused Triton kernels (the CUDA path). Lengths and pages are read on the device: no host
    synchronisation."""
    from nld_trt.plugins.block_attention.ops import block_attention, write_kv

    layout = cache.layout
    s = layout.scales[layer] if layout.scales is not None else None
    kc, vc = cache.k[layer], cache.v[layer]
    write_kv(k, v, kc, vc, tables, committed, chunk_lens,
             k_quant=s.k_quant if s else None, v_quant=s.v_quant if s else None)
    return block_attention(q, kc, vc, tables, committed, chunk_lens, block, scale,
                           k_scale=s.k_dequant if s else None, v_scale=s.v_dequant if s else None)


@dataclass
class PagedStep:
    """One eager pass against a PagedCache (built once, used by every layer)."""

    cache: PagedCache
    tables: torch.Tensor  # [B, W] long: each row's page table (padded past its pages)
    committed: torch.Tensor  # [B] committed length L per row
    chunk_lens: torch.Tensor  # [B] real chunk tokens per row
    block: torch.Tensor  # [B] bool: bidirectional chunk
    mask: torch.Tensor | None  # [B, 1, T, keys] bool, the reference path's attention mask
    write_rows: torch.Tensor  # [N] batch row of each real chunk token
    write_cols: torch.Tensor  # [N] chunk index of each real chunk token
    write_page: torch.Tensor  # [N] page of each real chunk token's K/V
    write_offset: torch.Tensor  # [N] its offset in the page
    read_pages: torch.Tensor  # [B * n] each row's first n pages, enough for `keys` positions
    keys: int  # positions each row reads: max over rows of L + n
    kernels: bool = False

    @classmethod
    def build(cls, cache: PagedCache, tables: torch.Tensor, committed: torch.Tensor, chunk_lens: torch.Tensor,
              block: torch.Tensor, chunk: int, keys: int, kernels: bool = False) -> PagedStep:
        """`keys`: max over rows of L + n (known on the host)."""
        p = cache.layout.page_size
        rows, cols = (torch.arange(chunk, device=tables.device)[None, :] < chunk_lens[:, None]).nonzero(as_tuple=True)
        pos = committed[rows] + cols
        mask = None if kernels else chunk_attention_mask(committed, chunk_lens, block, chunk, keys)
        read = tables[:, : -(-keys // p)].reshape(-1)
        return cls(cache, tables, committed, chunk_lens, block, mask, rows, cols, tables[rows, pos // p], pos % p,
                   read, keys, kernels)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write the chunk's k, v [B, Hkv, T, D] into the cache, then attend q [B, Hq, T, D]."""
        if self.kernels:
            return kernel_attend(self.cache, layer, q, k, v, self.tables, self.committed, self.chunk_lens, self.block,
                                 scale)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        ks, vs = store(self.cache, layer, k[self.write_rows, :, self.write_cols], v[self.write_rows, :, self.write_cols])
        kc[self.write_page, self.write_offset] = ks
        vc[self.write_page, self.write_offset] = vs
        k_all, v_all = gather_pages(self.cache, layer, self.read_pages, self.tables.shape[0], self.keys, q.dtype)
        return attention(q, k_all, v_all, self.mask, scale)


@dataclass
class StaticPagedStep:
    """One pass whose shapes depend only on (batch B, chunk length T) and which reads no tensor on the host,
    so it can be compiled once per shape and captured in a CUDA graph.

    Every row writes all T chunk positions: real tokens at committed..committed+n-1 of their pages, padding
    (chunk positions past n, and whole padding rows, whose page tables name only the scratch page) to the
    scratch page, which nothing reads as context. Without kernels, attention reads the first `keys`
    positions of each row's pages under the reference chunk mask, as the reference does (`keys` is the one
    size that varies between passes of a shape: the compiled pass takes it as a dynamic dimension); with
    kernels, the Triton kernels read the tables and lengths on the device.
    """

    cache: PagedCache
    tables: torch.Tensor  # [B, W]
    committed: torch.Tensor  # [B]
    chunk_lens: torch.Tensor  # [B] (padding rows: T, on the scratch page)
    block: torch.Tensor  # [B] bool
    dest_page: torch.Tensor  # [B, T] page of each chunk position's K/V (padding: the scratch page)
    dest_offset: torch.Tensor  # [B, T] offset in that page
    mask: torch.Tensor | None  # [B, 1, T, keys] bool (reference attention), None with kernels
    read_pages: torch.Tensor | None  # [B, keys] the page of each position attention reads (None with kernels)
    read_offsets: torch.Tensor | None  # [keys] its offset
    kernels: bool = False

    @classmethod
    def build(cls, cache: PagedCache, tables, committed, chunk_lens, block, chunk: int,
              positions: torch.Tensor | None, kernels: bool = False) -> StaticPagedStep:
        """From the pass's device tensors; `positions` (0..keys-1: keys is a symbolic size when compiled) are
        the positions the reference attention reads, at least max(committed + chunk_lens)."""
        layout = cache.layout
        p = layout.page_size
        j = torch.arange(chunk, device=tables.device)
        real = j[None, :] < chunk_lens[:, None]
        pos = torch.where(real, committed[:, None] + j, j)
        dest_page = torch.where(real, tables.gather(1, pos // p), layout.scratch)
        if kernels:
            return cls(cache, tables, committed, chunk_lens, block, dest_page, pos % p, None, None, None, True)
        mask = chunk_attention_mask(committed, chunk_lens, block, chunk, positions.shape[0])
        return cls(cache, tables, committed, chunk_lens, block, dest_page, pos % p, mask,
                   *read_index(tables, positions, p), False)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.kernels:
            return kernel_attend(self.cache, layer, q, k, v, self.tables, self.committed, self.chunk_lens, self.block,
                                 scale)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        ks, vs = store(self.cache, layer, k.transpose(1, 2), v.transpose(1, 2))
        kc[self.dest_page, self.dest_offset] = ks
        vc[self.dest_page, self.dest_offset] = vs
        k_all, v_all = gather(self.cache, layer, self.read_pages, self.read_offsets, q.dtype)
        return attention(q, k_all, v_all, self.mask, scale)
