"""The batched decoding loop: continuous batching of sequences of any mode over one executor's paged KV cache.

The batcher owns admission and page tables (nld_trt/kv/pages.py); the executor only runs passes over them.
- Admission is by free pages, up to `max_batch` sequences at once: a waiting sequence joins when the pool
  has the pages for its prompt and its first step, after what the running sequences need for theirs and a
  watermark of 1% of the pool kept for their growth (alone, it may take every page). It
  reuses the longest cached prefix of full pages of its prompt (all but the last prompt token, whose logits
  it needs; none when it asks for prompt log-probabilities), keyed by the token ids and, for an image prompt,
  by its images' content digests (`Sequence.extra_keys`), and prefills only the rest. A sequence whose
  first uncached page another joining sequence is about to compute waits one round and reuses it (`n` > 1,
  a shared system prompt).
- Joining sequences are prefilled together (causal, committed; long prompts in pieces; an image prompt's
  chunks carry its images' rows at their pad positions, from wherever its cached prefix ends, and take the
  executor's eager path; sequences scoring their prompt get a pass of their own that returns every
  position's logits), then every active sequence steps: each gathers its next chunk, its page table grows to
  cover it, one forward runs per chunk length (rows have their own pattern, LoRA switch and committed
  length), each sequence consumes its logits and commits what it accepted; committed full pages enter the
  prefix index. Finished sequences leave at once; their pages are freed or stay cached.
- Preemption: when a step needs more pages than the pool has, the most recently arrived sequences give
  theirs back and wait at the front of the queue, as vLLM's recompute preemption does. A sequence is
  preempted only between passes, where its KV cache holds exactly its committed tokens and everything else
  it is in the middle of (a dlm block, a linear_spec draft, an auto step) is Python state that it keeps; on
  resuming it re-prefills its committed tokens (reusing whatever is still cached), reads no logits from it
  and draws nothing, then feeds the chunk it would have fed. So its output is what an uninterrupted run
  gives (up to the float noise of K/V computed by a chunk of another shape, as any prefix reuse) and a
  sampled one keeps its law and its seeds' draws. The oldest sequence always advances, so every request
  that fits the pool alone finishes.

A failure is kept to the sequences it touches: one whose own rule raises fails alone, and a forward pass
that raises fails the rows it was computing; every other sequence carries on.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable

from ..executors.base import Chunk, Executor, PassBatch, PassRow
from ..kv.pages import PageManager, PageTable
from .ar import ARSequence
from .auto import AutoPlanner, AutoSequence
from .dlm import DLMSequence
from .linear_spec import LinearSpecSequence
from .sequence import Sequence

SEQUENCE_TYPES: dict[str, type[Sequence]] = {
    "ar": ARSequence,
    "dlm": DLMSequence,
    "linear_spec": LinearSpecSequence,
    "auto": AutoSequence,
}

_MANAGERS: weakref.WeakKeyDictionary[Executor, PageManager] = weakref.WeakKeyDictionary()


def page_manager(executor: Executor) -> PageManager:
    """The page manager of an executor's cache: one per executor, so every batcher on it (a served scheduler,
    `run`, `NLD.generate`) agrees on which page holds what, and the prefix cache outlives one call."""
    manager = _MANAGERS.get(executor)
    if manager is None:
        manager = _MANAGERS[executor] = PageManager(executor.layout.pages, executor.layout.page_size)
    return manager


def lookahead(seq: Sequence) -> int:
    """Positions past the committed ones a sequence's next pass may write: one token in ar, a block in the
    other modes (auto's options are never longer than its block_length)."""
    return 1 if seq.params.mode == "ar" else seq.params.block_length


def reach(seq: Sequence, committed: int) -> int:
    """Positions a sequence with `committed` positions may hold through its next pass: its committed ones and
    one pass of look-ahead, never more than the request can ever touch (`cache_positions`: an ar request with
    max_new_tokens 1 takes its token from the prefill and writes nothing past its prompt), so a request that
    check_fits accepts always fits a pool of one max_seq_len sequence."""
    return max(committed, min(committed + lookahead(seq), seq.params.cache_positions(len(seq.prompt))))


def wants_prompt_logprobs(seq: Sequence) -> bool:
    """A sequence that asks for its prompt's log-probabilities (any count, 0 included) computes its whole
    prompt (no cached prefix) in a pass that returns every position's logits."""
    return seq.params.prompt_logprobs is not None


def _failed(seq: Sequence, error: Exception) -> None:
    seq.fail(f"{type(error).__name__}: {error}")


class Batcher:
    """Continuous batching: sequences join (`submit`) and leave (finished or `cancel`led) between steps.

    `submit` and `cancel` may be called from other threads while one thread calls `step`: the waiting
    queue is a deque and cancellation is a flag the stepping thread acts on.
    """

    def __init__(self, executor: Executor, on_step: Callable[[Sequence], None] | None = None,
                 planner: AutoPlanner | None = None, pages: PageManager | None = None) -> None:
        self.executor = executor
        self.pages = pages if pages is not None else page_manager(executor)
        self.on_step = on_step
        self.planner = planner  # chooses the next step of `auto` sequences
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._started: dict[int, float] = {}
        self._arrivals = itertools.count()

    def submit(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    # one step -------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit waiting sequences (prefill) or advance the active ones by one step; return those that
        finished (or were cancelled) in this step, their pages already given back."""
        left = [s for s in self.active if s.cancelled]
        self.active = [s for s in self.active if not s.cancelled]
        for s in left:
            self._release(s)
        joining = self._admit(left)
        if joining:
            self.active += joining  # before the prefill: if it raises, `abort` still finds their pages
            self._prefill(joining)
            now = time.perf_counter()
            self._started.update((id(s), now) for s in joining if id(s) not in self._started)
        elif self.active:
            if self.planner is not None:
                self.planner.plan(self.active)
            started = time.perf_counter()
            self._step()
            if self.planner is not None:
                self.planner.observe(self.active, time.perf_counter() - started)
        still = []
        for s in self.active:
            if self.on_step is not None:
                self.on_step(s)
            (left if s.done else still).append(s)
        self.active = still
        for s in left:
            self._release(s)
            if id(s) in self._started:
                s.stats.decode_s = time.perf_counter() - self._started.pop(id(s))
            if s.cancelled and not s.done:
                s.finish("cancelled")
        return left

    def run(self) -> None:
        try:
            while not self.idle:
                self.step()
        finally:
            self.abort()

    def abort(self) -> None:
        """Give back the pages of every sequence in flight (after a failure; they are dropped)."""
        for s in [*self.active, *self.waiting]:
            self._release(s)
        self.active = []

    def _release(self, seq: Sequence) -> None:
        if seq.kv is not None and seq.kv.pages:
            self.pages.release(seq.kv)

    # admission ------------------------------------------------------------------------------------
    def _admit(self, left: list[Sequence]) -> list[Sequence]:
        """Waiting sequences that join now, in order, their page tables set up (cached prefix adopted, pages
        for the rest taken) and `todo` the tokens to prefill."""
        pages = self.pages
        # cancelled ones leave wherever they wait (they hold no pages, but their clients wait for the answer)
        for s in [s for s in list(self.waiting) if s.cancelled]:  # list(): one C-level copy (submit may run meanwhile)
            self.waiting.remove(s)
            left.append(s)
        budget = pages.available - sum(pages.shortfall(s.kv, reach(s, s.kv.length)) for s in self.active)
        watermark = max(1, pages.total // 100)
        joining: list[Sequence] = []
        inflight: set[int] = set()  # hashes of full pages joining sequences will compute
        while self.waiting and len(self.active) + len(joining) < self.executor.max_batch:
            s = self.waiting[0]
            resuming = s.kv is not None
            tokens = list(s.kv.tokens) if resuming else s.prompt
            extra = s.kv.extra if resuming else s.extra_keys
            reuse = not wants_prompt_logprobs(s)
            matched = pages.lookup(tokens, extra, len(tokens) if resuming else len(tokens) - 1) if reuse else []
            full = len(tokens) // pages.page_size if reuse and pages.prefix_cache else 0
            if full > len(matched) and pages.chain(tokens, extra, len(matched) + 1)[-1] in inflight:
                break  # another joining sequence computes this page now: reuse it next round
            cost = pages.pages_for(reach(s, len(tokens))) - len(matched) + pages.adoption_cost(matched)
            # beside others, keep a watermark free for their growth (fewer preemptions, as vLLM does)
            if cost > budget - (watermark if self.active or joining else 0):
                if not self.active and not joining:  # the pool is empty and it still does not fit: never will
                    self.waiting.popleft()
                    s.fail(f"the sequence needs {cost} KV-cache pages of {pages.page_size} positions and the cache "
                           f"has {pages.total}: shorten the prompt or lower max_new_tokens")
                    left.append(s)
                    continue
                break
            self.waiting.popleft()
            budget -= cost
            if full > len(matched):
                inflight.update(pages.chain(tokens, extra, full)[len(matched) :])
            table = PageTable(extra=tuple(extra))
            pages.adopt(table, matched, tokens, queried=len(s.prompt) if reuse and not resuming else 0)
            if not pages.grow(table, len(tokens)):  # cannot happen: the budget counted these pages
                raise RuntimeError("the page pool lost pages during admission")
            s.kv = table
            s.todo = tokens[table.length :]
            if resuming:
                s.stats.recomputed_tokens += len(s.todo)
            else:
                s.stats.cached_tokens = table.length
                s.stats.prefill_tokens = len(s.todo)
            joining.append(s)
        return joining

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Causal passes over each joining sequence's `todo` tokens, committed (prompt positions with their
        image rows). A new sequence then takes its first token from the last prompt position's logits; a
        resumed one carries on where it was. New sequences that asked for prompt_logprobs get every position's
        logits (their own pass: the others' are unchanged) and score their prompt."""
        start = time.perf_counter()
        piece = self.executor.max_prefill_chunk
        while True:
            rows: list[tuple[Sequence, Chunk]] = []
            for s in seqs:
                if s.todo and not s.done:
                    try:  # a prompt with images encodes them here (admission), at its first chunk that has some
                        rows.append((s, s.prefill_chunk(s.kv.length, s.todo[:piece])))
                    except Exception as e:  # noqa: BLE001 - this sequence's images failed, not the batch
                        _failed(s, e)
            if not rows:
                break
            scored = [(s, c) for s, c in rows if wants_prompt_logprobs(s) and not s.started]
            plain = [(s, c) for s, c in rows if not (wants_prompt_logprobs(s) and not s.started)]
            for group, all_logits in ((scored, True), (plain, False)):
                if group:
                    self._prefill_pass(group, all_logits)
        elapsed = time.perf_counter() - start
        for s in seqs:
            if not s.stats.prefill_s:
                s.stats.prefill_s = elapsed
            if not s.started and not s.done:  # its whole prompt came from the cache: cannot happen for a new one
                s.fail("internal error: a new sequence got no prefill logits")

    def _prefill_pass(self, group: list[tuple[Sequence, Chunk]], all_logits: bool) -> None:
        batch = PassBatch([PassRow(c, s.kv.length, s.kv.pages) for s, c in group], all_logits=all_logits)
        logits = self._guarded([s for s, _ in group], batch)
        if logits is None:
            return
        for r, (s, c) in enumerate(group):
            n, at = len(c.tokens), s.kv.length
            self.pages.commit(s.kv, c.tokens)
            s.todo = s.todo[n:]
            if s.started:
                continue
            try:
                if all_logits:
                    s.score_prompt(at, logits[r, :n])
                if not s.todo:
                    s.stats.nfe += 1
                    if not s.done:  # max_new_tokens 0: the prompt was all it asked for
                        s.begin(logits[r, n - 1] if all_logits else logits[r])
            except Exception as e:  # noqa: BLE001 - this sequence's rule failed, not the batch
                _failed(s, e)

    # decoding steps -------------------------------------------------------------------------------
    def _step(self) -> None:
        """One decoding step for every active sequence: pages for its next chunk (preempting the newest
        sequences when the pool runs out), then one forward per distinct chunk length."""
        chunks: dict[int, tuple[Sequence, Chunk]] = {}
        for s in self.active:
            try:
                chunks[id(s)] = (s, s.next_chunk())
            except Exception as e:  # noqa: BLE001 - this sequence's rule failed, not the batch
                _failed(s, e)
                self._release(s)  # now: its pages must not make `_reserve` preempt or fail the others
        self._reserve(chunks)
        by_len: dict[int, list[tuple[Sequence, Chunk]]] = {}
        for s, c in chunks.values():
            by_len.setdefault(len(c.tokens), []).append((s, c))
        for group in by_len.values():
            batch = PassBatch([PassRow(c, s.kv.length, s.kv.pages) for s, c in group])
            logits = self._guarded([s for s, _ in group], batch)
            if logits is None:
                continue
            for r, (s, c) in enumerate(group):
                s.stats.nfe += 1
                try:
                    self.pages.commit(s.kv, c.tokens[: s.consume(logits[r, : len(c.tokens)])])
                except Exception as e:  # noqa: BLE001 - this sequence's rule failed, not the batch
                    _failed(s, e)

    def _reserve(self, chunks: dict[int, tuple[Sequence, Chunk]]) -> None:
        """Grow every page table to cover its next chunk; while the pool cannot, preempt the most recently
        arrived sequence (its chunk waits with it)."""
        pages = self.pages

        def need(s: Sequence, c: Chunk) -> int:
            return pages.shortfall(s.kv, s.kv.length + len(c.tokens))

        while sum(need(s, c) for s, c in chunks.values()) > pages.available:
            victim = max((s for s, _ in chunks.values()), key=lambda s: s.arrival)
            del chunks[id(victim)]
            if not chunks:  # alone and still out of pages: it does not fit this cache
                victim.fail(f"out of KV-cache pages: the sequence needs more than the {pages.total} pages of the cache")
                break
            self.preempt(victim)
        for s, c in chunks.values():
            if not pages.grow(s.kv, s.kv.length + len(c.tokens)):
                raise RuntimeError("the page pool lost pages during a step")

    def preempt(self, seq: Sequence) -> None:
        """Give an active sequence's pages back (its full committed pages stay cached) and queue it first; it
        resumes where it was (between two passes of any step: see the module docstring)."""
        self.pages.release(seq.kv)
        self.active.remove(seq)
        seq.stats.preemptions += 1
        self.pages.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _guarded(self, seqs: list[Sequence], batch: PassBatch):
        """executor.forward, or None after failing every sequence of the pass if it raises."""
        try:
            return self.executor.forward(batch)
        except Exception as e:  # noqa: BLE001 - a device or executor error fails only this pass's rows
            for s in seqs:
                _failed(s, e)
            return None


def run(
    executor: Executor,
    sequences: Iterable[Sequence],
    on_step: Callable[[Sequence], None] | None = None,
    planner: AutoPlanner | None = None,
    pages: PageManager | None = None,
) -> list[Sequence]:
    """Decode every sequence to completion, at most `executor.max_batch` at a time, on the executor's page
    manager (or `pages`)."""
    batcher = Batcher(executor, on_step, planner, pages)
    everything = list(sequences)
    for s in everything:
        batcher.submit(s)
    batcher.run()
    return everything
