"""Shape, dtype and launch logic of the block-attention plugin, as plain Python (no torch, no TensorRT).

The torch entry points, the AOT tests and the TensorRT wrapper all build their launches from here, so the
kernel signature, the grid and the tile sizes have a single definition. Functions that take shapes work on
ints and on TensorRT's symbolic shape expressions alike (they only multiply and add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..dtypes import FLOAT_TYPES, FP8_MAX, KV_TYPES
from ..shapes import cdiv
from ..spec import FP8_MIN_ARCH, KernelSpec, aot_signature

MODULE = "nld_trt.plugins.block_attention.kernels"
LOG2E = 1.4426950408889634

ATTENTION_INPUTS = ("Q", "K", "V", "TABLES", "COMMITTED", "CHUNK_LENS", "IS_BLOCK")
ATTENTION_INTS = (
    "T", "HKV", "GROUPS", "MAX_KEYS",
    "stride_qb", "stride_qh", "stride_qt",
    "stride_kn", "stride_kh", "stride_kp",
    "stride_vn", "stride_vh", "stride_vp",
    "stride_ob", "stride_oh", "stride_ot",
    "stride_tb",
)
ATTENTION_FLOATS = ("qk_scale", "v_scale")
ATTENTION_CONSTEXPRS = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PAGE_SIZE", "UPCAST")

WRITE_INPUTS = ("K_NEW", "V_NEW", "K_IN", "V_IN", "TABLES", "COMMITTED", "CHUNK_LENS")  # K_IN/V_IN: aliased outputs
WRITE_INTS = (
    "T", "HKV", "MAX_KEYS",
    "stride_kb", "stride_kh", "stride_kt",
    "stride_vb", "stride_vh", "stride_vt",
    "stride_ckn", "stride_ckh", "stride_ckp",
    "stride_cvn", "stride_cvh", "stride_cvp",
    "stride_tb",
)
WRITE_FLOATS = ("k_inv_scale", "v_inv_scale")
WRITE_CONSTEXPRS = ("HEAD_DIM", "BLOCK_T", "BLOCK_D", "PAGE_SIZE", "QUANT_MAX")


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # packed (chunk token, query head of the group) rows per program
    block_n: int  # keys per inner-loop tile
    num_warps: int = 4
    num_stages: int = 2


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs K >= 16; the padding is masked)."""
    return max(16, 1 << math.ceil(math.log2(head_dim)))


# TensorRT builds one kernel per tactic and times them (shapes are symbolic at build time); the torch path
# picks by row count. Tactic 1 suits decode-like passes (few packed rows: no KV loaded for empty rows),
# tactic 2 longer chunks (each KV tile reused by more queries). fp32 tiles are smaller so that shared
# memory stays within the 48 KiB a launch gets without an opt-in.
_TACTICS_16BIT = {1: AttentionConfig(16, 64, 4, 2), 2: AttentionConfig(64, 32, 4, 2)}
_TACTICS_FP32 = {1: AttentionConfig(16, 32, 4, 1), 2: AttentionConfig(32, 32, 4, 1)}
INTERPRET_CONFIG = AttentionConfig(16, 16)  # numpy runs programs serially: small tiles, many boundaries


def attention_tactics(q: str) -> dict[int, AttentionConfig]:
    return _TACTICS_FP32 if q == "fp32" else _TACTICS_16BIT


def attention_config(rows: int, q: str, interpret: bool) -> AttentionConfig:
    """Tiles for `rows` = chunk length * GQA group size packed rows."""
    if interpret:
        return INTERPRET_CONFIG
    return attention_tactics(q)[1 if rows <= 16 else 2]


def check_shapes(q: Sequence[int], k_cache: Sequence[int], v_cache: Sequence[int], tables: Sequence[int],
                 batch_meta: Sequence[int]) -> None:
    """q [B, Hq, T, D]; caches [pages, P, Hkv, D]; page tables [B, W]; committed/chunk_lens/block [B]; Hq a
    multiple of Hkv."""
    if len(q) != 4 or len(k_cache) != 4 or tuple(k_cache) != tuple(v_cache):
        raise ValueError(f"expected q [B,Hq,T,D] and equal caches [pages,P,Hkv,D], got {q}, {k_cache}, {v_cache}")
    if q[3] != k_cache[3] or q[1] % k_cache[2]:
        raise ValueError(f"head dims differ or Hq={q[1]} is not a multiple of Hkv={k_cache[2]}")
    if len(tables) != 2 or tables[0] != q[0]:
        raise ValueError(f"page tables must be [B={q[0]}, W], got {list(tables)}")
    if any(m != q[0] for m in batch_meta):
        raise ValueError(f"per-sequence tensors must have B={q[0]} entries, got {list(batch_meta)}")


def attention_output(q_shape: Sequence[Any], q_dtype: str) -> tuple[tuple[Any, ...], str]:
    """The output has q's shape and dtype."""
    return tuple(q_shape), q_dtype


def attention_grid(batch: Any, kv_heads: Any, chunk: Any, groups: Any, cfg: AttentionConfig) -> tuple[Any, Any]:
    """(B * Hkv, ceil(T * groups / BLOCK_M)); works on ints and TensorRT shape expressions."""
    return batch * kv_heads, cdiv(chunk * groups, cfg.block_m)


def attention_scales(scale: float, k_scale: float, v_scale: float) -> dict[str, float]:
    """Folded float scalars: the K dequant scale and log2(e) go into the logits scale (exp2 softmax)."""
    return {"qk_scale": scale * k_scale * LOG2E, "v_scale": v_scale}


def attention_ints(q_shape, k_shape, table_shape, q_strides, k_strides, v_strides, o_strides,
                   table_strides) -> list[Any]:
    """Values of ATTENTION_INTS (element strides: q and out of [B, H, T], the caches' of [page, head, position]
    from their [pages, P, Hkv, D] strides, the tables' row stride; the last dims are contiguous). MAX_KEYS: the
    positions a page table covers (W x P)."""
    _, hq, t, _ = q_shape
    hkv = k_shape[2]
    return [t, hkv, hq // hkv, table_shape[1] * k_shape[1], *q_strides[:3], *page_strides(k_strides),
            *page_strides(v_strides), *o_strides[:3], table_strides[0]]


def page_strides(cache_strides: Sequence[Any]) -> list[Any]:
    """(page, head, position) strides of a [pages, P, Hkv, D] cache, the kernels' order."""
    return [cache_strides[0], cache_strides[2], cache_strides[1]]


def attention_spec(
    q: str, kv: str, head_dim: int, page_size: int, cfg: AttentionConfig, *, upcast: bool = False,
    specialize: dict[str, float] | None = None,
) -> KernelSpec:
    """Kernel variant for q/out dtype `q`, cache dtype `kv` and page size; `specialize` bakes float scalars in."""
    if q not in FLOAT_TYPES or kv not in KV_TYPES:
        raise TypeError(f"unsupported dtypes q={q} kv={kv}")
    specialize = specialize or {}
    inputs = dict(zip(ATTENTION_INPUTS, (q, kv, kv, "i32", "i32", "i32", "i32")))
    sig = aot_signature(inputs, ATTENTION_INTS, ATTENTION_FLOATS, {"O": q}, ATTENTION_CONSTEXPRS, specialize)
    constexprs = dict(specialize)
    constexprs.update(
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(head_dim), PAGE_SIZE=page_size,
        UPCAST=upcast,
    )
    return KernelSpec(
        MODULE, "block_attention_kernel", sig, constexprs, cfg.num_warps, cfg.num_stages, min_arch=_min_arch(kv)
    )


def _min_arch(*types: str) -> int:
    return FP8_MIN_ARCH if "fp8e4nv" in types else 80


def check_write_shapes(k: Sequence[Any], cache: Sequence[Any], tables: Sequence[Any]) -> None:
    """k, v [B, Hkv, T, D]; caches [pages, P, Hkv, D]; page tables [B, W]."""
    if len(k) != 4 or len(cache) != 4 or (k[1], k[3]) != (cache[2], cache[3]):
        raise ValueError(f"expected k, v [B,Hkv,T,D] and caches [pages,P,Hkv,D], got {list(k)}, {list(cache)}")
    if len(tables) != 2 or tables[0] != k[0]:
        raise ValueError(f"page tables must be [B={k[0]}, W], got {list(tables)}")


def write_block_t(chunk: int) -> int:
    """Chunk tokens per write program: the whole chunk up to 32."""
    return min(32, max(1, 1 << math.ceil(math.log2(max(chunk, 1)))))


def write_grid(batch: Any, kv_heads: Any, chunk: Any, block_t: int) -> tuple[Any, Any]:
    return batch * kv_heads, cdiv(chunk, block_t)


def write_scales(k_quant: float, v_quant: float) -> dict[str, float]:
    """The quantization multipliers of a quantized layout (x is stored as e4m3(clamp(x * quant)))."""
    return {"k_inv_scale": k_quant, "v_inv_scale": v_quant}


def write_ints(k_shape, cache_shape, table_shape, k_strides, v_strides, ck_strides, cv_strides,
               table_strides) -> list[Any]:
    """Values of WRITE_INTS."""
    return [k_shape[2], k_shape[1], table_shape[1] * cache_shape[1], *k_strides[:3], *v_strides[:3],
            *page_strides(ck_strides), *page_strides(cv_strides), table_strides[0]]


def write_spec(
    new: str, cache: str, head_dim: int, page_size: int, block_t: int, *, quantize: bool | None = None,
    specialize: dict[str, float] | None = None,
) -> KernelSpec:
    """Kernel variant writing `new`-typed K/V into a `cache`-typed paged cache. `quantize` (default: an FP8
    cache) stores e4m3(clamp(x * inv_scale)), what a quantized layout holds, in any cache dtype."""
    if new not in FLOAT_TYPES or cache not in KV_TYPES:
        raise TypeError(f"unsupported dtypes new={new} cache={cache}")
    if quantize is None:
        quantize = cache == "fp8e4nv"
    if cache == "fp8e4nv" and not quantize:
        raise TypeError("an FP8 cache stores quantized values: quantize must be on")
    specialize = specialize or {}
    inputs = dict(zip(WRITE_INPUTS, (new, new, cache, cache, "i32", "i32", "i32")))
    outputs = {"K_CACHE": cache, "V_CACHE": cache}
    sig = aot_signature(inputs, WRITE_INTS, WRITE_FLOATS, outputs, WRITE_CONSTEXPRS, specialize)
    constexprs = dict(specialize)
    constexprs.update(
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=block_d(head_dim), PAGE_SIZE=page_size,
        QUANT_MAX=FP8_MAX if quantize else 0.0,
    )
    return KernelSpec(MODULE, "write_kv_kernel", sig, constexprs, num_warps=4, num_stages=1, min_arch=_min_arch(cache))
