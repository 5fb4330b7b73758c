"""The paged KV cache: its layout (pages, page size, dtype, FP8 scales, the scratch page), the page manager
(reference-counted pages, per-sequence page tables, the prefix index and its hash chain, LRU eviction), the
prefix-cache events, and the attention steps that write and read pages (reference and kernels).

Every layer reads its shapes from `KVLayout`: the model's steps, the executors, the engine graph and its
TensorRT profiles, the kernels' launches and the cost model. The batcher (nld_trt/decoding/driver.py) owns
admission and page tables; executors only run passes over them.
"""

from .events import CacheCleared, ExtraKey, KVEvent, PagesRemoved, PagesStored, StoredPage
from .layout import DEFAULT_PAGE_SIZE, KVLayout, KVScales
from .pages import KVStats, PageManager, PageTable, page_hash

__all__ = ["DEFAULT_PAGE_SIZE", "CacheCleared", "ExtraKey", "KVEvent", "KVLayout", "KVScales", "KVStats",
           "PageManager", "PageTable", "PagesRemoved", "PagesStored", "StoredPage", "page_hash"]
