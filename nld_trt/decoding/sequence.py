"""One request being decoded: the state every mode shares (output, stop rules, thinking budget, sampling,
log-probabilities, stats).

A mode is a small state machine over this base: `start` consumes the prefill's last logits, then the
driver alternates `next_chunk` (what to feed) and `consume` (the pass's logits -> how many chunk positions
to commit) until `done`. Modes never call the executor, so any executor and any batch composition (other
requests, other modes) give the same tokens.

Every token a mode draws goes through `draw` (or `law` + the mode's own rule) with the row's output index,
which applies `min_tokens` (EOS and stop tokens banned before it), `bad_words` (decoding/bad_words.py: the
chunk the rows sit in says which tokens are decided around each) and the sampling filters the same way in
every mode; `append` emits tokens with the law each was drawn from and applies every stop rule.

With `prompt_logprobs`, the prefill hands the sequence the causal logits of its prompt (`score_prompt`):
each prompt token's log-probability given the tokens before it, from the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import NLDConfig
from ..errors import GenerationError
from ..executors.base import Chunk, ChunkEmbeds
from ..kv.events import ExtraKey
from ..kv.pages import PageTable
from .bad_words import BadWords, tail
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
    rank: int | None = None  # prompt tokens: 1 + the number of tokens more likely than this one


class PromptEmbeds(Protocol):
    """A prompt's image rows (nld_trt/vision/encoder.PromptImages): the rows replacing the image positions
    among prompt positions [start, end), or None where there are none; and the extra keys that make its
    images part of its KV pages' identity in the prefix cache (one per image: its span and content digest)."""

    extra_keys: tuple[ExtraKey, ...]

    def chunk(self, start: int, end: int) -> ChunkEmbeds | None: ...


class Sequence:
    """Shared state of one request. Subclasses: ARSequence, DLMSequence, LinearSpecSequence.

    `decode` (token ids -> text) is needed for stop strings and `text()`; `images`, for a prompt with images,
    gives the embedding rows its prefill chunks carry (the images are then seen only through the KV cache)."""

    def __init__(self, prompt: list[int], params: GenerationParams, config: NLDConfig, seed: int,
                 decode: Decode | None = None, images: PromptEmbeds | None = None) -> None:
        self.prompt = list(prompt)
        self.images = images
        self.params = params
        self.config = config
        self.mask_id = config.mask_token_id
        self.eos = frozenset(params.eos_token_ids or ())
        self.stop_ids = frozenset(params.stop_token_ids)
        self.banned = sorted(self.eos | self.stop_ids) if params.min_tokens > 0 else []
        self.bad_words = BadWords(params.bad_words)
        # with prompt_logprobs: one entry per prompt token, the first None (nothing precedes it)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
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
        # what else keys this prompt's KV: a VLM prompt's images (span + content digest), so equal pad ids
        # with other pictures never share pages, and the same picture in the next turn does
        self.extra_keys: tuple[ExtraKey, ...] = () if images is None else tuple(images.extra_keys)
        self.todo: list[int] = []
        self.arrival = 0
        self.started = False
        self.generator = (torch.Generator().manual_seed(seed % SEED_MOD)
                          if params.temperature > 0 else None)

    def prefill_chunk(self, start: int, tokens: list[int]) -> Chunk:
        """The causal prefill chunk feeding `tokens` at positions start.. (a piece of the prompt, from wherever
        its cached prefix ends; after a preemption, of the prompt and the committed output), with the image
        rows of the prompt positions it covers."""
        end = min(start + len(tokens), len(self.prompt))
        embeds = None if self.images is None or start >= end else self.images.chunk(start, end)
        return Chunk(list(tokens), embeds=embeds)

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
    def shaped(self, logits: torch.Tensor, first_index: int, chunk: torch.Tensor | list[int] | None = None,
               causal: bool = True) -> torch.Tensor:
        """Logits [N, V] about output indices first_index.. with min_tokens applied (EOS and stop tokens
        banned where fewer than min_tokens tokens precede) and bad_words. `chunk` None: one row, the token after
        the output so far; else the pass's chunk (chunk[0] the last output token, MASK where undecided), row r
        about chunk position r + 1, seeing only the tokens before it (`causal`) or the decided ones on both
        sides (a block pass)."""
        rows = self.params.min_tokens - first_index
        if self.banned and rows > 0:
            logits = logits.clone()
            logits[: min(rows, logits.shape[0]), self.banned] = float("-inf")
        if self.bad_words:
            logits = self._ban(logits, first_index, chunk, causal)
        return logits

    def _ban(self, logits: torch.Tensor, first_index: int, chunk, causal: bool) -> torch.Tensor:
        reach = self.bad_words.reach
        if chunk is None:
            known: list[int | None] = tail(self.prompt, self.out, reach)
            positions = [len(known) + r for r in range(logits.shape[0])]
        else:
            before = tail(self.prompt, self.out, reach + 1)[:-1]  # the tokens before chunk[0] (= out[-1])
            tokens = chunk.tolist() if isinstance(chunk, torch.Tensor) else list(chunk)
            known = before + [None if t == self.mask_id else t for t in tokens]
            positions = [len(before) + 1 + r for r in range(logits.shape[0])]
        logits = self.bad_words.mask(logits, known, positions, causal)
        dead = torch.isinf(logits).all(-1)
        if bool(dead.any()):
            i = first_index + int(dead.nonzero()[0, 0])
            raise GenerationError(f"bad_words (with min_tokens) ban every token at output index {i}: ban fewer words")
        return logits

    def draw(self, logits: torch.Tensor, first_index: int, chunk=None, causal: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates and confidences (select.candidates) of rows about output indices first_index.."""
        return candidates(self.shaped(logits, first_index, chunk, causal), self.sampling, self.generator)

    def law(self, logits: torch.Tensor, first_index: int, chunk=None, causal: bool = True) -> torch.Tensor:
        """[N, V] float64: the law each row's token is drawn from (select.law), min_tokens and bad_words applied."""
        return law(self.shaped(logits, first_index, chunk, causal), self.sampling)

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

    def score_prompt(self, start: int, logits: torch.Tensor) -> None:
        """Causal logits [n, V] of prompt positions start..start+n-1 (row j predicts the token at start+j+1):
        record each prompt token's log-probability under the plain softmax, its rank and the
        prompt_logprobs most likely tokens. With max_new_tokens 0 the sequence is done once the prompt is."""
        top = self.params.prompt_logprobs
        if top is None:
            return
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        targets = self.prompt[start + 1 : start + 1 + logits.shape[0]]
        for first in range(0, len(targets), 64):  # float64 rows, a slice at a time (V can be 131072)
            logp = torch.log_softmax(logits[first : first + 64].double(), -1).cpu()
            for j in range(logp.shape[0]):
                if first + j >= len(targets):
                    break
                t = targets[first + j]
                value = logp[j, t]
                self.prompt_logprobs.append(TokenLogprob(t, float(value), tuple(top_logprobs(logp[j], top)),
                                                         rank=1 + int((logp[j] > value).sum())))
        if len(self.prompt_logprobs) == len(self.prompt) and self.params.max_new_tokens == 0:
            self.stats.tokens = 0
            self.finish("length")

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
