"""Mode `ar`: one causal pass per token. NFE = generated tokens (the prefill produces the first)."""

from __future__ import annotations

import torch

from ..executors.base import Chunk
from .sequence import Sequence


class ARSequence(Sequence):
    mode = "ar"

    def _next_token(self, logits: torch.Tensor) -> None:
        forced = self.forced(len(self.out))
        token = forced if forced is not None else int(self.pick(logits[None])[0][0])
        self.pending = token
        self.append([token])

    def start(self, last_logits: torch.Tensor) -> None:
        self._next_token(last_logits)

    def next_chunk(self) -> Chunk:
        return Chunk([self.pending], block=False)

    def consume(self, logits: torch.Tensor) -> int:
        self._next_token(logits[0])
        return 1
