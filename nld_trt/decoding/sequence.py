"""One request being decoded: the state every mode shares (output, stop rules, thinking budget, stats).

A mode is a small state machine over this base: `start` consumes the prefill's last logits, then the
driver alternates `next_chunk` (what to feed) and `consume` (the pass's logits -> how many chunk positions
to commit) until `done`. Modes never call the executor, so any executor and any batch composition (other
requests, other modes) give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import NLDConfig
from ..executors.base import Chunk
from .params import GenerationParams


@dataclass
class Stats:
    tokens: int = 0
    nfe: int = 0  # forward passes, the prefill counted as one
    prefill_s: float = 0.0
    decode_s: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)  # linear_spec: tokens accepted per verify
    passes_per_block: list[int] = field(default_factory=list)  # dlm: denoising passes per block

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0

    def as_dict(self) -> dict:
        d = {
            "tokens": self.tokens,
            "nfe": self.nfe,
            "tpf": round(self.tpf, 4),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "tokens_per_s": round(self.tokens / self.decode_s, 2) if self.decode_s > 0 else None,
        }
        if self.accepted_per_step:
            d["accepted_per_step"] = self.accepted_per_step
            d["mean_accepted"] = round(sum(self.accepted_per_step) / len(self.accepted_per_step), 4)
        if self.passes_per_block:
            d["passes_per_block"] = self.passes_per_block
        return d


class Sequence:
    """Shared state of one request. Subclasses: ARSequence, DLMSequence, LinearSpecSequence."""

    def __init__(self, prompt: list[int], params: GenerationParams, config: NLDConfig, seed: int) -> None:
        self.prompt = list(prompt)
        self.params = params
        self.config = config
        self.mask_id = config.mask_token_id
        self.eos = frozenset(params.eos_token_ids or ())
        self.out: list[int] = []
        self.done = False
        self.cancelled = False
        self.finish_reason: str | None = None
        self.stats = Stats()
        self.slot: int | None = None
        self.generator = torch.Generator().manual_seed(seed) if params.temperature > 0 else None

    # the mode's state machine -------------------------------------------------------------------
    def start(self, last_logits: torch.Tensor) -> None:
        raise NotImplementedError

    def next_chunk(self) -> Chunk:
        raise NotImplementedError

    def consume(self, logits: torch.Tensor) -> int:
        raise NotImplementedError

    # shared rules -------------------------------------------------------------------------------
    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .select import candidates

        return candidates(logits, self.params.temperature, self.generator)

    def forced(self, index: int, before: list[int] | None = None) -> int | None:
        """The thinking budget: output index `max_thinking_tokens` is forced to end_think_token_id unless
        that token already appeared among the tokens before it (`before`, default the output so far)."""
        m = self.params.max_thinking_tokens
        if m is None or index != m:
            return None
        end = self.params.end_think_token_id
        return None if end in (self.out if before is None else before) else end

    def append(self, tokens: list[int]) -> int:
        """Emit tokens, stopping after an EOS or at max_new_tokens. Returns how many were emitted."""
        n = 0
        for t in tokens:
            if self.done:
                break
            self.out.append(int(t))
            n += 1
            if t in self.eos:
                self.finish("eos")
            elif len(self.out) >= self.params.max_new_tokens:
                self.finish("length")
        self.stats.tokens = len(self.out)
        return n

    def finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason

    def align(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits about chunk positions 1..T-1 from a block pass (position 0 is always known).
        llada: position j's own logits; dream: shifted, position j is predicted from j - 1."""
        return logits[1:] if self.config.dlm_type == "llada" else logits[:-1]
