"""The attention of one NLD forward pass over a chunk, as plain PyTorch.

This is the reference semantics of `shared/spec/nld-decoding.md` ("One forward pass, three ways") that the
PyTorch executor runs and that the fused kernel and the TensorRT plugin must reproduce. A batch row b has
`committed[b]` cached positions (0..L-1) and a chunk of `chunk_lens[b]` real tokens at L..L+n-1 (the chunk
tensor may be right-padded to a common T). Query j of row b sees:
- every committed position;
- chunk positions 0..j when the row is causal, all n chunk positions when the row is a block pass;
- never a padding position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_attention_mask(
    committed: torch.Tensor, chunk_lens: torch.Tensor, block: torch.Tensor, chunk: int, keys: int
) -> torch.Tensor:
    """Boolean mask [B, 1, chunk, keys]: True where query j of row b may attend to key position p."""
    device = committed.device
    p = torch.arange(keys, device=device).view(1, 1, keys)  # key position
    j = torch.arange(chunk, device=device).view(1, chunk, 1)  # query index in the chunk
    L = committed.view(-1, 1, 1)
    n = chunk_lens.view(-1, 1, 1)
    in_chunk = (p >= L) & (p < L + n)
    causal_ok = (p - L) <= j
    visible = (p < L) | (in_chunk & (block.view(-1, 1, 1) | causal_ok))
    return visible.unsqueeze(1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Grouped-query attention. q [B, Hq, T, D]; k, v [B, Hkv, S, D] (query head h reads KV head h // (Hq / Hkv));
    mask [B, 1, T, S] bool or None. SDPA's own GQA (`enable_gqa`): the same numbers as repeating each KV head
    for its queries first (checked bit for bit on CPU), without materialising the repeated K/V."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
