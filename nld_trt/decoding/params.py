"""Generation parameters, their defaults per mode, and their validation (clear errors, never tracebacks).

Every field is checked for its type and its range here, once, whatever the entry point (Python API, CLI,
Triton tensors and parameters, the OpenAI front end): an error names the field, the value and what is
allowed. Nothing unchecked reaches the decoding loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..config import NLDConfig
from ..errors import GenerationError
from .select import Sampling

MODES = ("ar", "dlm", "linear_spec", "auto")
ACCEPTANCE_RULES = ("speculative", "official")
DRAFT_RULES = ("repeat", "once")
DEFAULT_THRESHOLD = {"ar": 0.0, "dlm": 0.9, "linear_spec": 0.0, "auto": 0.0}

MAX_INT32 = 2**31 - 1
MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit (TensorRT-LLM's type); seed + i wraps around
MAX_TOP_LOGPROBS = 20  # as the OpenAI API
MAX_STOPS = 32  # stop strings and stop token ids per request
MAX_STOP_CHARS = 512
MAX_TEMPERATURE = 100.0
MAX_BAD_WORDS = 256  # banned words per request
MAX_BAD_WORD_TOKENS = 64  # tokens per banned word


@dataclass(frozen=True)
class GenerationParams:
    mode: str = "ar"
    max_new_tokens: int = 256
    block_length: int | None = None  # None: the checkpoint's block_size
    threshold: float | None = None  # None: 0.9 for dlm, 0.0 for linear_spec
    temperature: float = 0.0
    top_k: int = 0  # sampling only: keep the k most likely tokens (0: off)
    top_p: float = 1.0  # sampling only: nucleus mass (1: off)
    min_p: float = 0.0  # sampling only: drop tokens below min_p x the most likely one's probability (0: off)
    seed: int = 0
    steps_per_block: int | None = None  # dlm: at most this many denoising passes per block (None: B)
    eos_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's; () never stops early
    stop: tuple[str, ...] = ()  # stop strings: the output text ends just before the first one
    stop_token_ids: tuple[int, ...] = ()  # tokens that end generation (finish_reason "stop")
    min_tokens: int = 0  # EOS and stop tokens cannot be generated before this many tokens
    logprobs: bool = False  # record each generated token's log-probability
    top_logprobs: int = 0  # ... and the N most likely alternatives (needs logprobs)
    max_thinking_tokens: int | None = None
    end_think_token_id: int | None = None
    lora: bool = True  # linear_spec drafts with the LoRA adapter when the checkpoint has one
    acceptance: str = "speculative"  # linear_spec at temperature > 0: "speculative" or "official"
    draft: str = "repeat"  # linear_spec with threshold > 0: "repeat" passes until no MASK is left, or "once"
    allow_lossy: bool = False  # auto may also choose dlm (not lossless)
    # None: not asked; N >= 0: each prompt token's log-probability (from the causal prefill pass) and the N most
    # likely alternatives; the first token has none. With it, max_new_tokens may be 0 (score the prompt only).
    prompt_logprobs: int | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()  # token-id words no output may complete (decoding/bad_words.py)

    def resolved(self, config: NLDConfig) -> GenerationParams:
        """Defaults filled in from the checkpoint and the mode; list fields become tuples."""
        mode = self.mode
        b = self.block_length if self.block_length is not None else config.block_size
        return replace(
            self,
            block_length=b,
            threshold=self.threshold if self.threshold is not None else DEFAULT_THRESHOLD.get(mode, 0.0),
            steps_per_block=self.steps_per_block if self.steps_per_block is not None else b,
            eos_token_ids=_tuple(self.eos_token_ids) if self.eos_token_ids is not None else config.eos_token_ids,
            stop=(self.stop,) if isinstance(self.stop, str) else _tuple(self.stop),
            stop_token_ids=_tuple(self.stop_token_ids),
            bad_words=tuple(_tuple(w) for w in _tuple(self.bad_words)),
        )

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.min_p)

    def validate(self, config: NLDConfig, max_block: int) -> None:
        """Raise GenerationError naming the bad parameter. Call on `resolved()` parameters."""
        if self.mode not in MODES:
            raise GenerationError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS)
        # scoring the prompt alone (prompt_logprobs) needs no new token
        _integer("max_new_tokens", self.max_new_tokens, 0 if self.prompt_logprobs is not None else 1, MAX_INT32)
        _integer("block_length", self.block_length, 1, max_block)
        _real("threshold", self.threshold, 0.0, 1.0)
        _real("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _integer("top_k", self.top_k, 0, config.vocab_size)
        _real("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise GenerationError("top_p must be in (0, 1], got 0 (1 turns the filter off)")
        _real("min_p", self.min_p, 0.0, 1.0)
        _integer("seed", self.seed, 0, MAX_SEED)
        _integer("steps_per_block", self.steps_per_block, 1, self.block_length)
        _choice("acceptance", self.acceptance, ACCEPTANCE_RULES)
        _choice("draft", self.draft, DRAFT_RULES)
        for t in self.eos_token_ids or ():
            _check_id("eos token id", t, config)
        if len(self.stop) > MAX_STOPS or len(self.stop_token_ids) > MAX_STOPS:
            raise GenerationError(f"at most {MAX_STOPS} stop strings and {MAX_STOPS} stop token ids per request")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise GenerationError(f"stop must be a list of non-empty strings of at most {MAX_STOP_CHARS} "
                                      f"characters, got {s!r}")
        for t in self.stop_token_ids:
            _check_id("stop_token_ids", t, config)
        _integer("min_tokens", self.min_tokens, 0, self.max_new_tokens)
        _flag("logprobs", self.logprobs)
        _flag("lora", self.lora)
        _flag("allow_lossy", self.allow_lossy)
        if self.allow_lossy and self.mode != "auto":
            raise GenerationError(f"allow_lossy is for mode auto (it lets auto choose dlm), not {self.mode}")
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise GenerationError("top_logprobs needs logprobs=true")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise GenerationError(f"at most {MAX_BAD_WORDS} bad_words per request, got {len(self.bad_words)}")
        for word in self.bad_words:
            if not isinstance(word, tuple) or not 1 <= len(word) <= MAX_BAD_WORD_TOKENS:
                raise GenerationError(f"bad_words must be non-empty token-id sequences of at most {MAX_BAD_WORD_TOKENS} "
                                      f"tokens, got {word!r}")
            for t in word:
                _check_id("bad_words", t, config)
        if (self.max_thinking_tokens is None) != (self.end_think_token_id is None):
            raise GenerationError("a thinking budget needs both max_thinking_tokens and end_think_token_id")
        if self.max_thinking_tokens is not None:
            _integer("max_thinking_tokens", self.max_thinking_tokens, 0, MAX_INT32)
            _check_id("end_think_token_id", self.end_think_token_id, config)

    def cache_positions(self, prompt_len: int) -> int:
        """Cache positions a request can touch: the prompt, the output and one chunk of look-ahead."""
        lookahead = 0 if self.mode == "ar" else self.block_length
        return prompt_len + self.max_new_tokens - 1 + lookahead


FIELDS = tuple(f.name for f in fields(GenerationParams))


def _tuple(v) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    raise GenerationError(f"expected a list, got {type(v).__name__} {v!r}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(name: str, v, low: int, high: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise GenerationError(f"{name} must be an integer in [{low}, {high}], got {v!r}")


def _real(name: str, v, low: float, high: float) -> None:
    if not _number(v) or not low <= v <= high:
        raise GenerationError(f"{name} must be a number in [{low:g}, {high:g}], got {v!r}")


def _flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise GenerationError(f"{name} must be true or false, got {v!r}")


def _choice(name: str, v, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise GenerationError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")


def _check_id(what: str, t, config: NLDConfig) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size:
        raise GenerationError(f"{what} must be a token id in [0, {config.vocab_size}), got {t!r}")
