"""Mode `ar`: one causal pass per token. NFE = generated tokens (the prefill produces the first)."""

from __future__ import annotations

import torch

from ..executors.base import Chunk
from .sequence import Sequence


class ARSequence(Sequence):
    mode = "ar"

    def _next_token(self, logits: torch.Tensor) -> None:
        index = len(self.out)
        forced = self.forced(index)
        token = forced if forced is not None else int(self.draw(logits[None], index)[0][0])
        self.pending = token
        self.append([token], self.law_if_logged(logits[None], index, forced))

    def start(self, last_logits: torch.Tensor) -> None:
        self._next_token(last_logits)

    def next_chunk(self) -> Chunk:
        return Chunk([self.pending], block=False)

    def consume(self, logits: torch.Tensor) -> int:
        self._next_token(logits[0])
        return 1
