"""What the engine graph (nld_trt/engine/onnx_graph.py) takes per pass, in one place for the executors that
run it (ONNX Runtime, TensorRT): the non-cache inputs of an `Executor._forward` call, a VLM graph's image
rows, and the cache names."""

from __future__ import annotations

from collections.abc import Sequence

import torch

INPUTS = ("input_ids", "page_table", "committed", "chunk_lens", "block", "lora", "logit_positions")
IMAGE_ROWS = "image_rows"  # a vision-language model's graph only (engine builds of older nld-trt lack it)


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


def image_feeds(tokens: torch.Tensor, embeds: Sequence, vocab_size: int, hidden: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, image_rows) of a VLM graph's pass, TensorRT-LLM's prompt-table convention: the image rows of
    every chunk, [(row, ChunkEmbeds)], concatenated into one table, and each of their positions' id replaced by
    vocab_size + its row's index in that table. A pass without images feeds one zero row (never read)."""
    if not embeds:
        return tokens, torch.zeros(1, hidden, dtype=dtype, device=tokens.device)
    tokens = tokens.clone()
    n = 0
    for row, e in embeds:
        k = len(e.positions)
        tokens[row, torch.tensor(e.positions, device=tokens.device)] = torch.arange(
            vocab_size + n, vocab_size + n + k, device=tokens.device)
        n += k
    rows = torch.cat([e.rows.to(tokens.device, dtype) for _, e in embeds])
    return tokens, rows.contiguous()
