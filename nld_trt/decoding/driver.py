"""The batched decoding loop: continuous batching of sequences of any mode over one executor.

Sequences wait for a KV-cache slot, are prefilled together (causal, committed; prompts longer than the
executor's prefill chunk go in pieces), then step together: each step gathers every active sequence's next
chunk, runs one forward per chunk length (rows have their own pattern, LoRA switch and committed length),
hands each sequence its logits and commits what it accepted. Finished sequences leave at once and their
slots go to waiting ones.

A failure is kept to the sequences it touches: one whose own rule raises fails alone, and a forward pass
that raises fails the rows it was computing; every other sequence carries on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from ..executors.base import Chunk, Executor
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


def _failed(seq: Sequence, error: Exception) -> None:
    seq.fail(f"{type(error).__name__}: {error}")


def _guarded(executor: Executor, seqs: list[Sequence], slots: list[int], chunks: list[Chunk],
             all_logits: bool = True):
    """executor.forward, or None after failing every sequence of the pass if it raises."""
    try:
        return executor.forward(slots, chunks, all_logits=all_logits)
    except Exception as e:  # noqa: BLE001 - a device or executor error fails only this pass's rows
        for s in seqs:
            _failed(s, e)
        return None


def prefill(executor: Executor, seqs: list[Sequence]) -> None:
    """Causal passes over the prompts, committed; each sequence then takes its first token. Sequences that
    asked for prompt_logprobs get every position's logits (their own pass: the others' are unchanged)."""
    start = time.perf_counter()
    done = [0] * len(seqs)
    piece = executor.max_prefill_chunk
    while True:
        chunks: dict[int, Chunk] = {}
        for i, s in enumerate(seqs):
            if done[i] < len(s.prompt) and not s.done:
                try:  # a prompt with images encodes them here (admission), at its first chunk
                    chunks[i] = s.prompt_chunk(done[i], done[i] + piece)
                except Exception as e:  # noqa: BLE001 - this sequence's images failed, not the batch
                    _failed(s, e)
        if not chunks:
            break
        scored = [i for i in chunks if seqs[i].params.prompt_logprobs is not None]
        for group, all_logits in ((scored, True), ([i for i in chunks if i not in scored], False)):
            if group:
                _prefill_pass(executor, seqs, group, [chunks[i] for i in group], done, all_logits)
    elapsed = time.perf_counter() - start
    for s in seqs:
        s.stats.prefill_s = elapsed


def _prefill_pass(executor: Executor, seqs: list[Sequence], rows: list[int], chunks: list[Chunk], done: list[int],
                  all_logits: bool) -> None:
    logits = _guarded(executor, [seqs[i] for i in rows], [seqs[i].slot for i in rows], chunks, all_logits)
    if logits is None:
        return
    for r, i in enumerate(rows):
        s, n = seqs[i], len(chunks[r].tokens)
        executor.commit(s.slot, n)
        try:
            if all_logits:
                s.score_prompt(done[i], logits[r, :n])
            done[i] += n
            if done[i] == len(s.prompt):
                s.stats.nfe += 1
                if not s.done:  # max_new_tokens 0: the prompt was all it asked for
                    s.start(logits[r, n - 1] if all_logits else logits[r])
        except Exception as e:  # noqa: BLE001 - this sequence's rule failed, not the batch
            _failed(s, e)


def step(executor: Executor, seqs: list[Sequence]) -> None:
    """One decoding step for every sequence: one forward per distinct chunk length."""
    chunks: dict[int, Chunk] = {}
    for i, s in enumerate(seqs):
        try:
            chunks[i] = s.next_chunk()
        except Exception as e:  # noqa: BLE001 - this sequence's rule failed, not the batch
            _failed(s, e)
    by_len: dict[int, list[int]] = {}
    for i, c in chunks.items():
        by_len.setdefault(len(c.tokens), []).append(i)
    for rows in by_len.values():
        logits = _guarded(executor, [seqs[i] for i in rows], [seqs[i].slot for i in rows], [chunks[i] for i in rows])
        if logits is None:
            continue
        for r, i in enumerate(rows):
            s = seqs[i]
            s.stats.nfe += 1
            try:
                executor.commit(s.slot, s.consume(logits[r, : len(chunks[i].tokens)]))
            except Exception as e:  # noqa: BLE001 - this sequence's rule failed, not the batch
                _failed(s, e)


class Batcher:
    """Continuous batching: sequences join (`submit`) and leave (finished or `cancel`led) between steps.

    `submit` and `cancel` may be called from other threads while one thread calls `step`: the waiting
    queue is a deque and cancellation is a flag the stepping thread acts on.
    """

    def __init__(self, executor: Executor, on_step: Callable[[Sequence], None] | None = None,
                 planner: AutoPlanner | None = None) -> None:
        self.executor = executor
        self.on_step = on_step
        self.planner = planner  # chooses the next step of `auto` sequences
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._started: dict[int, float] = {}

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    def step(self) -> list[Sequence]:
        """Admit waiting sequences (prefill) or advance the active ones by one step; return those that
        finished (or were cancelled) in this step, their slots already released."""
        left = [s for s in self.active if s.cancelled]
        self.active = [s for s in self.active if not s.cancelled]
        joining = []
        while self.waiting and self.executor.free_slots:
            s = self.waiting.popleft()
            if s.cancelled:
                left.append(s)
                continue
            s.slot = self.executor.allocate()
            joining.append(s)
        if joining:
            prefill(self.executor, joining)
            now = time.perf_counter()
            self._started.update((id(s), now) for s in joining)
            self.active += joining
        elif self.active:
            if self.planner is not None:
                self.planner.plan(self.active)
            started = time.perf_counter()
            step(self.executor, self.active)
            if self.planner is not None:
                self.planner.observe(self.active, time.perf_counter() - started)
        still = []
        for s in self.active:
            if self.on_step is not None:
                self.on_step(s)
            (left if s.done else still).append(s)
        self.active = still
        for s in left:
            if s.slot is not None:
                self.executor.release(s.slot)
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
            for s in self.active:
                self.executor.release(s.slot)
            self.active = []


def run(
    executor: Executor,
    sequences: Iterable[Sequence],
    on_step: Callable[[Sequence], None] | None = None,
    planner: AutoPlanner | None = None,
) -> list[Sequence]:
    """Decode every sequence to completion, at most `executor.max_batch` at a time."""
    batcher = Batcher(executor, on_step, planner)
    everything = list(sequences)
    for s in everything:
        batcher.submit(s)
    batcher.run()
    return everything
