"""Generation parameters, their defaults per mode, and their validation (clear errors, never tracebacks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..config import NLDConfig
from ..errors import GenerationError

MODES = ("ar", "dlm", "linear_spec")
ACCEPTANCE_RULES = ("speculative", "official")
DEFAULT_THRESHOLD = {"ar": 0.0, "dlm": 0.9, "linear_spec": 0.0}


@dataclass(frozen=True)
class GenerationParams:
    mode: str = "ar"
    max_new_tokens: int = 256
    block_length: int | None = None  # None: the checkpoint's block_size
    threshold: float | None = None  # None: 0.9 for dlm, 0.0 for linear_spec
    temperature: float = 0.0
    seed: int = 0
    steps_per_block: int | None = None  # dlm: at most this many denoising passes per block (None: B)
    eos_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's; () never stops early
    max_thinking_tokens: int | None = None
    end_think_token_id: int | None = None
    lora: bool = True  # linear_spec drafts with the LoRA adapter when the checkpoint has one
    acceptance: str = "speculative"  # linear_spec at temperature > 0: "speculative" or "official"

    def resolved(self, config: NLDConfig) -> GenerationParams:
        """Defaults filled in from the checkpoint and the mode."""
        mode = self.mode
        b = self.block_length if self.block_length is not None else config.block_size
        return replace(
            self,
            block_length=b,
            threshold=self.threshold if self.threshold is not None else DEFAULT_THRESHOLD.get(mode, 0.0),
            steps_per_block=self.steps_per_block if self.steps_per_block is not None else b,
            eos_token_ids=tuple(self.eos_token_ids) if self.eos_token_ids is not None else config.eos_token_ids,
        )

    def validate(self, config: NLDConfig, max_block: int) -> None:
        """Raise GenerationError naming the bad parameter. Call on `resolved()` parameters."""
        if self.mode not in MODES:
            raise GenerationError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        b = self.block_length
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= max_block:
            raise GenerationError(f"block_length must be an integer in [1, {max_block}], got {b!r}")
        if not _number(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise GenerationError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise GenerationError(f"seed must be a non-negative integer, got {self.seed!r}")
        s = self.steps_per_block
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise GenerationError(f"steps_per_block must be a positive integer, got {s!r}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise GenerationError(f"acceptance must be one of {', '.join(ACCEPTANCE_RULES)}, got {self.acceptance!r}")
        for t in self.eos_token_ids or ():
            _check_id("eos token id", t, config)
        if (self.max_thinking_tokens is None) != (self.end_think_token_id is None):
            raise GenerationError("a thinking budget needs both max_thinking_tokens and end_think_token_id")
        if self.max_thinking_tokens is not None:
            m = self.max_thinking_tokens
            if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                raise GenerationError(f"max_thinking_tokens must be an integer >= 0, got {m!r}")
            _check_id("end_think_token_id", self.end_think_token_id, config)

    def cache_positions(self, prompt_len: int) -> int:
        """Cache positions a request can touch: the prompt, the output and one chunk of look-ahead."""
        lookahead = 0 if self.mode == "ar" else self.block_length
        return prompt_len + self.max_new_tokens - 1 + lookahead


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_id(what: str, t, config: NLDConfig) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size:
        raise GenerationError(f"{what} must be a token id in [0, {config.vocab_size}), got {t!r}")
