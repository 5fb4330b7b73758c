"""One request being decoded: the state every mode shares (output, stop rules, thinking budget, sampling,
log-probabilities, stats).

A mode is a small state machine over this base: `start` consumes the prefill's last logits, then the
driver alternates `next_chunk` (what to feed) and `consume` (the pass's logits -> how many chunk positions
to commit) until `done`. Modes never call the executor, so any executor and any batch composition (other
requests, other modes) give the same tokens.

Every token a mode draws goes through `draw` (or `law` + the mode's own rule) with the row's output index,
which applies `min_tokens` (EOS and stop tokens banned before it) and the sampling filters the same way in
every mode; `append` emits tokens with the law each was drawn from and applies every stop rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import NLDConfig
from ..errors import GenerationError
from ..executors.base import Chunk
from ..kv.events import ExtraKey
from ..kv.pages import PageTable
from .params import GenerationParams
from .select import candidates, law, top_logprobs
from .text import Decode, OutputText

SEED_MOD = 2**64


@dataclass
class Stats:
    tokens: int = 0
    nfe: int = 0  # forward passes, the prefill counted as one
    prefill_s: float = 0.0
    decode_s: float = 0.0
    mode: str = ""
    accepted_per_step: list[int] = field(default_factory=list)  # linear_spec: tokens added per verify
    draft_passes_per_step: list[int] = field(default_factory=list)  # linear_spec: draft passes per step
    passes_per_block: list[int] = field(default_factory=list)  # dlm: denoising passes per block
    auto: dict | None = None  # auto: steps per option and why they were chosen
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prefill_tokens: int = 0  # prompt tokens the prefill computed
    preemptions: int = 0  # times the sequence gave its KV pages back and waited (nld_trt/decoding/driver.py)
    recomputed_tokens: int = 0  # committed tokens re-prefilled after preemptions

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0

    @property
    def nfe_reference(self) -> int:
        """NFE as the reference counts it: dlm leaves the prefill out, ar and linear_spec count it."""
        return max(self.nfe - 1, 0) if self.mode == "dlm" else self.nfe

    @property
    def tpf_reference(self) -> float:
        return self.tokens / self.nfe_reference if self.nfe_reference else 0.0

    def as_dict(self) -> dict:
        d = {
            "tokens": self.tokens,
            "nfe": self.nfe,
            "tpf": round(self.tpf, 4),
            "nfe_reference": self.nfe_reference,
            "tpf_reference": round(self.tpf_reference, 4),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "tokens_per_s": round(self.tokens / self.decode_s, 2) if self.decode_s > 0 else None,
            "cached_tokens": self.cached_tokens,
            "prefill_tokens": self.prefill_tokens,
        }
        if self.preemptions:
            d["preemptions"] = self.preemptions
            d["recomputed_tokens"] = self.recomputed_tokens
        if self.accepted_per_step:
            d["accepted_per_step"] = self.accepted_per_step
            d["mean_accepted"] = round(sum(self.accepted_per_step) / len(self.accepted_per_step), 4)
        if self.draft_passes_per_step:
            d["draft_passes_per_step"] = self.draft_passes_per_step
        if self.passes_per_block:
            d["passes_per_block"] = self.passes_per_block
        if self.auto is not None:
            d["auto"] = self.auto
        return d


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the law it was drawn from, and the most likely others."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sequence:
    """Shared state of one request. Subclasses: ARSequence, DLMSequence, LinearSpecSequence.

    `decode` (token ids -> text) is needed for stop strings and `text()`."""

    def __init__(self, prompt: list[int], params: GenerationParams, config: NLDConfig, seed: int,
                 decode: Decode | None = None) -> None:
        self.prompt = list(prompt)
        self.params = params
        self.config = config
        self.mask_id = config.mask_token_id
        self.eos = frozenset(params.eos_token_ids or ())
        self.stop_ids = frozenset(params.stop_token_ids)
        self.banned = sorted(self.eos | self.stop_ids) if params.min_tokens > 0 else []
        self.sampling = params.sampling
        if params.stop and decode is None:
            raise GenerationError("stop strings need the tokenizer's decode")
        self.output = OutputText(decode, params.stop)
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.done = False
        self.cancelled = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # the stop string or stop token that ended it
        self.error: str | None = None
        self.stats = Stats(mode=getattr(self, "mode", ""))
        # KV bookkeeping, the batcher's (nld_trt/decoding/driver.py): the page table, the tokens still to
        # prefill, the arrival order (preemption takes the newest), whether the prefill logits were consumed
        self.kv: PageTable | None = None
        self.extra_keys: tuple[ExtraKey, ...] = ()  # what else keys this prompt's KV (a VLM's image spans)
        self.todo: list[int] = []
        self.arrival = 0
        self.started = False
        self.generator = (torch.Generator().manual_seed(seed % SEED_MOD)
                          if params.temperature > 0 else None)

    # the mode's state machine -------------------------------------------------------------------
    def begin(self, last_logits: torch.Tensor) -> None:
        """The prompt is in the cache: take the first token (once; a resumed sequence does not begin again)."""
        self.started = True
        self.start(last_logits)

    def start(self, last_logits: torch.Tensor) -> None:
        raise NotImplementedError

    def next_chunk(self) -> Chunk:
        raise NotImplementedError

    def consume(self, logits: torch.Tensor) -> int:
        raise NotImplementedError

    # shared rules -------------------------------------------------------------------------------
    def shaped(self, logits: torch.Tensor, first_index: int) -> torch.Tensor:
        """Logits [N, V] about output indices first_index.. with min_tokens applied (EOS and stop tokens
        banned where fewer than min_tokens tokens precede)."""
        rows = self.params.min_tokens - first_index
        if not self.banned or rows <= 0:
            return logits
        logits = logits.clone()
        logits[: min(rows, logits.shape[0]), self.banned] = float("-inf")
        return logits

    def draw(self, logits: torch.Tensor, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates and confidences (select.candidates) of rows about output indices first_index.."""
        return candidates(self.shaped(logits, first_index), self.sampling, self.generator)

    def law(self, logits: torch.Tensor, first_index: int) -> torch.Tensor:
        """[N, V] float64: the law each row's token is drawn from (select.law), min_tokens applied."""
        return law(self.shaped(logits, first_index), self.sampling)

    def law_if_logged(self, logits: torch.Tensor, first_index: int, forced: int | None = None) -> torch.Tensor | None:
        """The law of one drawn token when logprobs are asked for; a forced token's is a point mass."""
        if not self.params.logprobs:
            return None
        return self.point_law(forced)[None] if forced is not None else self.law(logits, first_index)

    def point_law(self, token: int) -> torch.Tensor:
        """The law of a token that was forced, not drawn: all the mass on it."""
        p = torch.zeros(self.config.vocab_size, dtype=torch.float64)
        p[token] = 1.0
        return p

    def emit_next(self, logits: torch.Tensor) -> int:
        """Draw (or force, by the thinking budget) the next output token from one row of logits and emit it,
        with its law when logprobs are asked for. Returns the token."""
        index = len(self.out)
        forced = self.forced(index)
        token = forced if forced is not None else int(self.draw(logits[None], index)[0][0])
        self.append([token], self.law_if_logged(logits[None], index, forced))
        return token

    def forced(self, index: int, before: list[int] | None = None) -> int | None:
        """The thinking budget: output index `max_thinking_tokens` is forced to end_think_token_id unless
        that token already appeared among the tokens before it (`before`, default the output so far)."""
        m = self.params.max_thinking_tokens
        if m is None or index != m:
            return None
        end = self.params.end_think_token_id
        return None if end in (self.out if before is None else before) else end

    def append(self, tokens: list[int], laws: torch.Tensor | None = None) -> int:
        """Emit tokens (with `laws`, the law [n, V] each was drawn from, when logprobs are asked for),
        stopping after an EOS, a stop token, a stop string or at max_new_tokens. Returns how many stay."""
        first = len(self.out)
        for i, t in enumerate(tokens):
            if self.done:
                break
            t = int(t)
            self.out.append(t)
            if self.params.logprobs:
                self.logprobs.append(self._logprob(t, None if laws is None else laws[i]))
            if t in self.eos:
                self.finish("eos")
            elif t in self.stop_ids:
                self.finish("stop", t)
            elif len(self.out) >= self.params.max_new_tokens:
                self.finish("length")
        hit = self.output.find_stop(self.out, first) if self.output.stops else None
        if hit is not None:
            k, stop = hit
            del self.out[k:]
            del self.logprobs[k:]
            self.finish("stop", stop)
        self.stats.tokens = len(self.out)
        return len(self.out) - first

    def _logprob(self, token: int, p: torch.Tensor | None) -> TokenLogprob:
        if p is None:
            raise AssertionError(f"{type(self).__name__} emitted a token without the law it was drawn from")
        logp = torch.log(p.double())
        return TokenLogprob(token, float(logp[token]), tuple(top_logprobs(logp, self.params.top_logprobs)))

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.done = True
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def fail(self, message: str) -> None:
        """End this request with an error (the batch carries on without it)."""
        self.error = message
        self.finish("error")

    def text(self) -> str:
        """The output text: ends before a stop string; a final stop token's text is left out."""
        return self.output.final(self.out, drop_last=isinstance(self.stop_reason, int))

    def align(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits about chunk positions 1..T-1 from a block pass (position 0 is always known).
        llada: position j's own logits; dream: shifted, position j is predicted from j - 1."""
        return logits[1:] if self.config.dlm_type == "llada" else logits[:-1]
