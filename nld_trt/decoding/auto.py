"""Mode `auto`: each step, the deployment picks ar or linear_spec (and the block length) for every `auto`
request, to commit the most tokens per second with the batch it has now.

Why it is lossless: between steps every mode is in the same state, the committed KV cache holding the prompt
and all emitted tokens but the last, and the last one not yet fed. An `ar` step feeds it and draws one token;
a `linear_spec` step drafts from it and commits exactly the verified tokens. So a request may switch at any
step boundary: greedy, it emits exactly the tokens of `ar`; sampled, both steps draw from the verifier's law
(speculative acceptance is exact), so the law is unchanged. `dlm` (lossy) is a choice only for requests that
allow it (`allow_lossy`).

How it chooses (`AutoPlanner.plan`, before each step): every sequence at a step boundary is free, the others
have their next chunk fixed. A step runs one forward per distinct chunk length, whose time the measured cost
model gives (nld_trt/executors/cost.py), plus what each sequence costs the decoding loop itself per step,
learnt from the steps' measured times (`observe`). Each option has a yield per pass: ar 1 token; linear_spec with block
b the expected tokens of one draft + verify, E(b) = (1 - a^b) / (1 - a) for the request's per-draft acceptance
a, over its passes; dlm the request's tokens per denoising pass. The planner maximises the batch's expected
tokens per second over assignments where the requests most likely to profit take one option and the rest
ar, for every option, under a latency guard: no request's time per token may exceed `guard` times its time
per token if the whole batch stepped ar. Each request keeps its own estimate of a (a Beta posterior over its
verify outcomes, from a deployment-wide prior), so a request that drafts badly falls back to a shorter
block or ar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..executors.base import Chunk
from .dlm import DLMSequence
from .linear_spec import LinearSpecSequence
from .params import DEFAULT_THRESHOLD

BLOCKS = (4, 8, 16, 32)
AR = ("ar", 1)


def label(option: tuple[str, int]) -> str:
    return "ar" if option[0] == "ar" else f"{option[0]}/{option[1]}"


class Cost(Protocol):
    """Seconds of one forward pass: its tokens, query-key pairs, rows and keys (cached + chunk positions)."""

    def pass_time(self, tokens: float, attention: float = 0.0, rows: float = 0.0, keys: float = 0.0) -> float: ...


@dataclass
class Acceptance:
    """A request's per-draft-token acceptance a (Beta posterior over verify outcomes: each matched draft
    a success, the first mismatch a failure) and its dlm tokens per denoising pass."""

    accepted: float  # prior pseudo-counts, then observed matches
    rejected: float
    draft_passes: float = 1.0  # linear_spec draft passes per step, running mean
    dlm_tokens: float = 2.0  # dlm tokens per denoising pass, prior
    dlm_weight: float = 1.0

    @classmethod
    def prior(cls, rate: float, weight: float = 4.0) -> Acceptance:
        return cls(rate * weight, (1 - rate) * weight)

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def optimistic_rate(self) -> float:
        """The posterior mean plus one standard deviation: a request whose acceptance is still uncertain gets
        to try drafting (else a pessimistic prior would keep everyone on ar and nobody would learn)."""
        n = self.accepted + self.rejected
        return min(self.rate + (self.rate * (1 - self.rate) / (n + 1)) ** 0.5, 0.999)

    def observe(self, matches: int, block: int, passes: int, keep: float = 1.0) -> None:
        """One verify: `matches` drafts accepted of block - 1. `keep` < 1 forgets old evidence (the
        deployment-wide estimate follows the traffic)."""
        self.accepted = self.accepted * keep + matches
        self.rejected = self.rejected * keep + (1 if matches < block - 1 else 0)  # all matched: no failure seen
        self.draft_passes += 0.3 * (passes - self.draft_passes)

    def seeded(self, weight: float = 4.0) -> Acceptance:
        """A new request's prior: this estimate's rates, with the weight of a few observations."""
        return Acceptance(self.rate * weight, (1 - self.rate) * weight, self.draft_passes, self.dlm_tokens)

    def observe_dlm(self, tokens: int, passes: int) -> None:
        total = self.dlm_tokens * self.dlm_weight + tokens
        self.dlm_weight += max(passes, 1)
        self.dlm_tokens = total / self.dlm_weight

    def expected(self, block: int) -> float:
        """Expected tokens one linear_spec step commits with this block (matched drafts + the bonus), at the
        optimistic rate."""
        a = self.optimistic_rate
        return (1 - a**block) / (1 - a)


class AutoSequence(DLMSequence, LinearSpecSequence):
    """An `auto` request: between steps it is at a boundary; the planner (`choose`) sets the next step."""

    mode = "auto"

    def __init__(self, *args, prior: float = 0.7, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.acceptance = Acceptance.prior(prior)
        self.shared: Acceptance | None = None  # the deployment-wide estimate this request also feeds
        self.option: tuple[str, int] | None = None  # the step in progress; None at a boundary
        self.steps: dict[str, int] = {}
        self.decisions: dict[str, dict[str, Any]] = {}  # per chosen option: why (expected tokens/s)

    # the boundary -------------------------------------------------------------------------------
    @property
    def at_boundary(self) -> bool:
        return self.option is None and not self.done

    def options(self, blocks: tuple[int, ...]) -> list[tuple[str, int]]:
        """What this request may do next: ar, linear_spec with a block up to its block_length, and dlm if it
        allows lossy decoding."""
        top = self.params.block_length
        sizes = sorted({b for b in blocks if b <= top} | {top})
        opts = [AR] + [("linear_spec", b) for b in sizes if b > 1]
        if self.params.allow_lossy:
            opts += [("dlm", b) for b in sizes if b > 1]
        return opts

    def yield_per_pass(self, option: tuple[str, int]) -> float:
        """Expected tokens this request commits per forward pass with this option."""
        kind, b = option
        remaining = self.params.max_new_tokens - len(self.out)
        if kind == "ar":
            return 1.0
        if kind == "linear_spec":
            return min(self.acceptance.expected(b), remaining) / (1 + self.acceptance.draft_passes)
        return min(b - 1, remaining) / ((b - 1) / self.acceptance.dlm_tokens + 1)  # denoise passes + commit

    def choose(self, option: tuple[str, int], why: dict[str, Any] | None = None) -> None:
        kind, b = option
        self.option = option
        name = label(option)
        self.steps[name] = self.steps.get(name, 0) + 1
        if why is not None:
            d = self.decisions.setdefault(name, {"steps": 0, "expected_tokens_per_s": 0.0, "rejected": {}})
            d["steps"] += 1
            d["expected_tokens_per_s"] += (why["chosen"] - d["expected_tokens_per_s"]) / d["steps"]
            if why.get("rejected"):
                r = d["rejected"].setdefault(why["rejected"], {"times": 0, "expected_tokens_per_s": 0.0})
                r["times"] += 1
                r["expected_tokens_per_s"] += (why["rejected_value"] - r["expected_tokens_per_s"]) / r["times"]
        if kind == "linear_spec":
            self.t = self.out[-1]
            LinearSpecSequence._new_draft(self, b)
        elif kind == "dlm":
            self._open_block(b)

    # the mode's state machine -------------------------------------------------------------------
    def start(self, last_logits: torch.Tensor) -> None:
        self.emit_next(last_logits)

    @property
    def chunk_length(self) -> int:
        return 1 if self.option in (None, AR) else self.option[1]

    @property
    def fill_threshold(self) -> float:
        """dlm steps fill at dlm's own default threshold (the request's threshold is linear_spec's draft one)."""
        return DEFAULT_THRESHOLD["dlm"]

    def next_chunk(self) -> Chunk:
        if self.option is None:  # nobody planned this step: speculate with the request's own block length
            self.choose(("linear_spec", self.params.block_length))
        kind = self.option[0]
        if kind == "ar":
            return Chunk([self.out[-1]], block=False)
        if kind == "linear_spec":
            return LinearSpecSequence.next_chunk(self)
        return DLMSequence.next_chunk(self)

    def consume(self, logits: torch.Tensor) -> int:
        kind, b = self.option
        if kind == "ar":
            self.emit_next(logits[0])
            self.option = None
            return 1
        if kind == "linear_spec":
            verifying = self.verifying
            committed = LinearSpecSequence.consume(self, logits)
            if verifying:  # the step ended
                self.acceptance.observe(self.matches, b, self.passes)
                if self.shared is not None:
                    self.shared.observe(self.matches, b, self.passes, keep=0.98)
                self.option = None
            return committed
        committed = DLMSequence.consume(self, logits)
        if committed or self.done:
            self.acceptance.observe_dlm(min(b - 1, len(self.out) - 1 - self.block_start), self.passes)
            self.option = None
        return committed

    def _new_draft(self, block_length: int | None = None) -> None:
        """After a verify the step is over: the planner sets up the next one."""

    def _begin_block(self, logits: torch.Tensor) -> None:
        """After a dlm commit the step is over: draw the token it predicts, then back to a boundary."""
        self.emit_next(logits)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        """The request's auto stats are written once, when it ends (not rebuilt at every step)."""
        super().finish(reason, stop_reason)
        if self.steps:
            self.stats.auto = self.auto_stats()

    def auto_stats(self) -> dict[str, Any]:
        """Steps per option, and for each chosen option the expected batch tokens/s it promised and the best
        rejected option's."""
        why = {name: {"steps": d["steps"], "expected_tokens_per_s": round(d["expected_tokens_per_s"], 1),
                      "rejected": {k: {"times": r["times"], "expected_tokens_per_s": round(r["expected_tokens_per_s"], 1)}
                                   for k, r in d["rejected"].items()}}
               for name, d in self.decisions.items()}
        return {"steps": dict(self.steps), "why": why, "acceptance_rate": round(self.acceptance.rate, 4)}


def fixed_yield(seq) -> float:
    """Expected tokens per pass of a sequence whose next chunk is already fixed (any mode)."""
    if isinstance(seq, AutoSequence):
        return seq.yield_per_pass(seq.option) if seq.option else 1.0
    s = seq.stats
    if s.accepted_per_step:
        return (sum(s.accepted_per_step) / len(s.accepted_per_step)) / (
            1 + sum(s.draft_passes_per_step) / max(len(s.draft_passes_per_step), 1))
    if s.passes_per_block:
        return seq.params.block_length / (sum(s.passes_per_block) / len(s.passes_per_block) + 1)
    return 1.0


@dataclass
class AutoPlanner:
    """Chooses the next step of every `auto` request at a boundary (see the module docstring).

    `cost`: the measured cost model, or a function returning it (measured on first use). `force`: a test hook,
    (sequence, decision number) -> option, that overrides the choice."""

    cost: Cost | Callable[[], Cost]
    blocks: tuple[int, ...] = BLOCKS
    guard: float = 4.0
    force: Callable[[AutoSequence, int], tuple[str, int]] | None = None
    prior: Acceptance = field(default_factory=lambda: Acceptance.prior(0.7))  # deployment-wide, learnt
    decisions: int = 0
    mix: dict[str, int] = field(default_factory=dict)  # steps planned per option, for the metrics
    row_overhead: float = 0.0  # seconds each sequence adds to a step beyond its forward passes, learnt

    def observe(self, active: list, seconds: float) -> None:
        """A decode step of `active` took `seconds`: learn what a step costs beyond the forwards the cost
        model predicts (the decoding loop's own work per sequence: selection, bookkeeping, Python), as a
        running estimate per sequence. On a GPU it is small; on a CPU it can dominate an ar step."""
        if not active or not hasattr(self.cost, "pass_time"):
            return
        groups: dict[int, list[float]] = {}
        for s in active:
            _add(groups, s.chunk_length, _cache(s))
        predicted = sum(self.cost.pass_time(*g) for g in groups.values())
        per_row = max(0.0, (seconds - predicted) / len(active))
        self.row_overhead += 0.05 * (per_row - self.row_overhead)

    @property
    def model(self) -> Cost:
        if not hasattr(self.cost, "pass_time"):
            self.cost = self.cost()
        return self.cost

    def plan(self, active: list) -> None:
        free = [s for s in active if isinstance(s, AutoSequence) and s.at_boundary]
        if not free:
            return
        for s in free:
            if s.shared is None:  # new: start from what the deployment has seen
                s.acceptance, s.shared = self.prior.seeded(), self.prior
        if self.force is not None:
            for s in free:
                self._take(s, self.force(s, self.decisions), None)
            return
        fixed = [s for s in active if not (isinstance(s, AutoSequence) and s.at_boundary) and not s.done]
        for s, option, why in self.choose(fixed, free):
            self._take(s, option, why)

    def _take(self, seq: AutoSequence, option: tuple[str, int], why: dict | None) -> None:
        self.decisions += 1
        self.mix[label(option)] = self.mix.get(label(option), 0) + 1
        seq.choose(option, why)

    def choose(self, fixed: list, free: list[AutoSequence]) -> list[tuple[AutoSequence, tuple[str, int], dict]]:
        """For every option: the requests ranked by what they would yield with it take it one by one (the
        rest step ar); the best batch rate that keeps the latency guard wins. Incremental, O(options x N)."""
        cost = self.model
        base: dict[int, list[float]] = {}
        base_yield = 0.0
        for s in fixed:
            _add(base, s.chunk_length, _cache(s))
            base_yield += fixed_yield(s)
        for s in free:
            _add(base, 1, _cache(s))

        rows = len(fixed) + len(free)

        def seconds_of(groups: dict[int, list[float]]) -> float:
            return sum(cost.pass_time(*g) for g in groups.values() if g[0] > 0) + self.row_overhead * rows

        ar_seconds = seconds_of(base)
        ar_rate = (base_yield + len(free)) / ar_seconds
        best_rate, best = ar_rate, [AR] * len(free)
        per_option: dict[tuple[str, int], float] = {AR: ar_rate}
        allowed = [set(s.options(self.blocks)) for s in free]
        for option in sorted(set().union(*allowed) - {AR}):
            b = option[1]
            gains = {i: s.yield_per_pass(option) for i, s in enumerate(free) if option in allowed[i]}
            groups = {k: list(v) for k, v in base.items()}
            total, moved = base_yield + len(free), []
            for i in sorted(gains, key=lambda i: -gains[i]):
                cache = _cache(free[i])
                _add(groups, 1, cache, -1)
                _add(groups, b, cache)
                total += gains[i] - 1.0
                moved.append(i)
                # the smallest yield per pass: the latest moved (ranked), or an ar request's 1
                slowest = gains[i] if len(moved) == len(free) else min(1.0, gains[i])
                seconds = seconds_of(groups)
                if seconds / slowest > self.guard * ar_seconds:
                    continue  # someone would wait too long per token
                rate = total / seconds
                per_option[option] = max(per_option.get(option, 0.0), rate)
                if rate > best_rate:
                    best_rate = rate
                    best = [option if j in moved else AR for j in range(len(free))]
        out = []
        for s, o in zip(free, best):
            others = {k: v for k, v in per_option.items() if k != o}
            rejected = max(others, key=others.get) if others else None
            out.append((s, o, {"chosen": best_rate, "rejected": label(rejected) if rejected else None,
                               "rejected_value": others[rejected] if rejected else 0.0}))
        return out


def _cache(seq) -> int:
    """Committed KV positions of a sequence between or within steps: the prompt and all output but the last."""
    return len(seq.prompt) + max(len(seq.out) - 1, 0)


def _add(groups: dict[int, list[float]], chunk: int, cache: int, sign: int = 1) -> None:
    """Add (or with sign -1 remove) one row of `chunk` tokens after `cache` positions to its forward:
    [tokens, query-key pairs, rows, keys]."""
    g = groups.setdefault(chunk, [0.0, 0.0, 0.0, 0.0])
    g[0] += sign * chunk
    g[1] += sign * chunk * (cache + chunk)
    g[2] += sign
    g[3] += sign * (cache + chunk)
