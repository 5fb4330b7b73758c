"""Fused chunk attention over the paged KV cache (causal or block rows, GQA, FP8 cache) and the paged cache write."""

from .launch import AttentionConfig
from .ops import block_attention, write_kv

__all__ = ["AttentionConfig", "block_attention", "write_kv"]
