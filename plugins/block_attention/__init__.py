"""Fused chunk attention over the slot KV cache (causal or block rows, GQA, FP8 cache) and the cache write."""

from .launch import AttentionConfig
from .ops import block_attention, write_kv

__all__ = ["AttentionConfig", "block_attention", "write_kv"]
