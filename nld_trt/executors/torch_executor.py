"""The PyTorch executor: the reference, on CPU or CUDA."""

from __future__ import annotations

import torch

from ..attention import chunk_attention_mask
from ..model import CacheStep, KVCache, NLDModel
from .base import Executor


def kernels_available() -> bool:
    """Whether the fused Triton kernels can run (OpenAI Triton importable)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class TorchExecutor(Executor):
    """`kernels`: run attention and the cache write with the fused Triton kernels (nld_trt.plugins).
    Default: on CUDA when Triton is installed; the reference path (index_put + SDPA) otherwise."""

    def __init__(self, model: NLDModel, max_batch: int = 8, max_seq_len: int = 2048, max_chunk: int = 128,
                 kernels: bool | None = None) -> None:
        super().__init__(model.config, max_batch, max_seq_len, max_chunk)
        p = next(model.parameters())
        self.model = model.eval()
        self.cache = KVCache(model.config, max_batch, max_seq_len, p.dtype, p.device)
        self.kernels = (p.device.type == "cuda" and kernels_available()) if kernels is None else kernels

    @property
    def has_lora(self) -> bool:
        return self.model.has_lora

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def _forward(self, slots, tokens, chunk_lens, block, lora, committed, all_logits):
        b, t = tokens.shape
        positions = committed[:, None] + torch.arange(t, device=tokens.device)
        keys = int((committed + chunk_lens).max())
        mask = None if self.kernels else chunk_attention_mask(committed, chunk_lens, block, t, keys)
        rows, cols = (torch.arange(t, device=tokens.device)[None, :] < chunk_lens[:, None]).nonzero(as_tuple=True)
        first = int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + b, device=slots.device)).all())
        step = CacheStep(self.cache, slots, committed, chunk_lens, block, mask, rows, cols, positions[rows, cols],
                         keys, first if contiguous else None, self.kernels)
        lora_rows = lora if (self.model.has_lora and bool(lora.any())) else None
        hidden = self.model(tokens, positions, mask, step, lora_rows)
        if not all_logits:
            hidden = hidden[torch.arange(b, device=hidden.device), chunk_lens - 1]
        return self.model.logits(hidden).float()
