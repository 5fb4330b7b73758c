"""What the engine graph (nld_trt/engine/onnx_graph.py) takes per pass, in one place for the executors that
run it (ONNX Runtime, TensorRT): the non-cache inputs of an `Executor._forward` call and the cache names."""

from __future__ import annotations

import torch

INPUTS = ("input_ids", "page_table", "committed", "chunk_lens", "block", "lora", "logit_positions")


def cache_names(num_layers: int) -> list[str]:
    return [f"past_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]


def present_name(past: str) -> str:
    return past.replace("past_", "present_", 1)


def input_feeds(tokens, tables, chunk_lens, block, lora, committed, all_logits) -> dict[str, torch.Tensor]:
    """The graph's non-cache inputs for one `_forward` call: int32, contiguous, on the tokens' device;
    logit_positions [B, T] (every position) or [B, 1] (each chunk's last one)."""
    b, t = tokens.shape
    if all_logits:
        positions = torch.arange(t, device=tokens.device).expand(b, t)
    else:
        positions = (chunk_lens - 1)[:, None]
    feeds = {"input_ids": tokens, "page_table": tables, "committed": committed, "chunk_lens": chunk_lens,
             "block": block, "lora": lora, "logit_positions": positions}
    return {k: v.to(device=tokens.device, dtype=torch.int32).contiguous() for k, v in feeds.items()}
