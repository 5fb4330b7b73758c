"""The KV cache's layout: one pool of pages that every layer of the data path reads its shapes from.

The cache of each layer is one tensor of `pages + 1` pages, [pages + 1, P, Hkv, D] (K and V alike; position
-major within a page, as vLLM's cache: a run of pages read whole is a [positions, Hkv, D] block): pages
0..pages-1 hold sequences' positions (position p of a sequence lives at offset p % P of the page its page
table names at index p // P), the last one is the scratch page, where static-shape passes write their
padding and which no sequence owns. A sequence's page table has at most `table_width` entries.

The storage dtype is the model's (float32, bf16, fp16) or FP8 e4m3. A quantized layout (FP8 KV-cache
checkpoints) carries per-layer scales and is applied when K/V are written: the cache holds
e4m3(clamp(x * quant)) (in an FP8 tensor, or exactly in a wider one) and attention reads it back times
`dequant`, in the reference path, the Triton kernels and the engine graph alike. `quant` and `dequant` are
float32 values (quant = 448 / (448 * scale), dequant = 1 / quant), ModelOpt's own operation order, so a
loaded checkpoint reproduces its calibrated model bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import DEFAULT_PAGE_SIZE, NLDConfig
from ..errors import NLDError

FP8_MAX = 448.0
MIN_TABLE_WIDTH = 2  # compiled passes read at least two pages (torch.compile specializes sizes 0 and 1)


@dataclass(frozen=True)
class KVScales:
    """One layer's FP8 scales as float32 values: x is stored as e4m3(clamp(x * quant)), read as stored * dequant."""

    k_quant: float
    k_dequant: float
    v_quant: float
    v_dequant: float

    @classmethod
    def from_scales(cls, k_scale: float, v_scale: float) -> KVScales:
        """From a checkpoint's k_scale / v_scale, in ModelOpt's fake-quantization order (amax = 448 * scale,
        quant = 448 / amax, dequant = 1 / quant), each step rounded to float32 as torch computes it."""

        def pair(scale: float) -> tuple[float, float]:
            amax = torch.tensor(scale, dtype=torch.float32) * FP8_MAX
            q = FP8_MAX / amax
            return float(q), float(1.0 / q)

        (kq, kd), (vq, vd) = pair(k_scale), pair(v_scale)
        return cls(kq, kd, vq, vd)


@dataclass(frozen=True)
class KVLayout:
    """Pages, page size, storage dtype and (FP8) scales of one executor's KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    pages: int  # pages sequences can hold (the scratch page is one more)
    page_size: int
    max_seq_len: int  # the longest sequence: its page table has table_width entries
    dtype: torch.dtype = torch.float32
    # per layer: a quantized (FP8 KV-cache) layout whose scales the reference path and kernels apply. An engine's
    # FP8 cache has none here: its plan's write and attention nodes carry them (nld_trt/engine/onnx_graph.py)
    scales: tuple[KVScales, ...] | None = None

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.pages < 1 or self.max_seq_len < 2:
            raise NLDError(f"a KV layout needs pages >= 1, page_size >= 1 and max_seq_len >= 2, got {self.pages}, "
                           f"{self.page_size}, {self.max_seq_len}")
        if self.scales is not None and len(self.scales) != self.layers:
            raise NLDError(f"an FP8 KV layout needs one scale pair per layer ({self.layers}), got {len(self.scales)}")

    # sizes ------------------------------------------------------------------------------------------
    @property
    def scratch(self) -> int:
        """The page no sequence owns: static passes write their padding there."""
        return self.pages

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """One layer's K (or V) tensor: [pages + 1, P, Hkv, D]."""
        return (self.pages + 1, self.page_size, self.kv_heads, self.head_dim)

    @property
    def table_width(self) -> int:
        """Entries of a page table: enough pages for max_seq_len positions (at least MIN_TABLE_WIDTH)."""
        return max(MIN_TABLE_WIDTH, self.pages_for(self.max_seq_len))

    @property
    def tokens(self) -> int:
        """Positions the pool holds."""
        return self.pages * self.page_size

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's K and V, scratch page included."""
        return (self.pages + 1) * self.page_size * self.bytes_per_token

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def describe(self) -> str:
        fp8 = self.dtype == torch.float8_e4m3fn
        q = " (FP8 scales)" if self.quantized else " (scales in the engine)" if fp8 else ""
        return (f"{self.pages} pages x {self.page_size} positions = {self.tokens} KV positions, "
                f"{str(self.dtype).removeprefix('torch.')}{q}, {self.nbytes / 2**20:.1f} MiB")

    # building one -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: NLDConfig, max_seq_len: int, dtype: torch.dtype, *, tokens: int | None = None,
              gb: float | None = None, page_size: int = DEFAULT_PAGE_SIZE,
              scales: tuple[KVScales, ...] | None = None, default_tokens: int | None = None) -> KVLayout:
        """The layout of a cache of `tokens` positions, or of `gb` GiB (at most one of the two; neither:
        `default_tokens`). The pool always holds at least one full-length sequence (a request that fits
        alone never fails for lack of pages), so a smaller size is an error naming the minimum."""
        if tokens is not None and gb is not None:
            raise NLDError("give the KV cache size in tokens or in GB, not both")
        if page_size is None or isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise NLDError(f"page_size must be a positive integer, got {page_size!r}")
        store = torch.float8_e4m3fn if scales is not None else dtype
        per_token = bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, store)
        if gb is not None:
            if not isinstance(gb, (int, float)) or isinstance(gb, bool) or not gb > 0 or not math.isfinite(gb):
                raise NLDError(f"kv_cache_gb must be a positive number, got {gb!r}")
            tokens = int(gb * 2**30) // per_token
            what = f"{gb:g} GiB ({tokens} positions of {per_token} bytes)"
        elif tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise NLDError(f"kv_cache_tokens must be a positive integer, got {tokens!r}")
            what = f"{tokens} positions"
        else:
            tokens = default_tokens if default_tokens is not None else max_seq_len
            what = f"{tokens} positions (the default)"
        pages = -(-tokens // page_size)
        need = -(-max_seq_len // page_size)
        if pages < need:
            raise NLDError(f"a KV cache of {what} holds {pages} pages of {page_size}, fewer than the {need} that one "
                           f"sequence of max_seq_len {max_seq_len} needs: give at least {need * page_size} tokens "
                           f"({need * page_size * per_token / 2**30:.3g} GiB) or a smaller max_seq_len")
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, pages, page_size,
                   max_seq_len, store, scales)


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one position in every layer."""
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def default_cache_tokens(device: torch.device | str, max_batch: int, max_seq_len: int, per_token: int,
                         fraction: float = 0.8) -> int:
    """What a cache holds when nobody says: max_batch full-length sequences (the memory slots took before
    pages), on a GPU at most `fraction` of its free memory (every request of a saturated deployment then
    waits for pages instead of failing at load)."""
    tokens = max_batch * max_seq_len
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        tokens = min(tokens, int(free * fraction) // per_token)
    return max(tokens, max_seq_len)
