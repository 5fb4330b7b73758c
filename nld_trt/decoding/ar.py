"""Mode `ar`: one causal pass per token. NFE = generated tokens (the prefill produces the first)."""

from __future__ import annotations

import torch

from ..executors.base import Chunk
from .sequence import Sequence


class ARSequence(Sequence):
    mode = "ar"
    chunk_length = 1

    def _next_token(self, logits: torch.Tensor) -> None:
        self.pending = self.emit_next(logits)

    def start(self, last_logits: torch.Tensor) -> None:
        self._next_token(last_logits)

    def next_chunk(self) -> Chunk:
        return Chunk([self.pending], block=False)

    def consume(self, logits: torch.Tensor) -> int:
        self._next_token(logits[0])
        return 1
