"""The batched decoding loop: continuous batching of sequences of any mode over one executor.

Sequences wait for a KV-cache slot, are prefilled together (causal, committed; prompts longer than the
executor's prefill chunk go in pieces), then step together: each step gathers every active sequence's next
chunk, runs one forward per chunk length (rows have their own pattern, LoRA switch and committed length),
hands each sequence its logits and commits what it accepted. Finished sequences leave at once and their
slots go to waiting ones.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from ..executors.base import Chunk, Executor
from .ar import ARSequence
from .dlm import DLMSequence
from .linear_spec import LinearSpecSequence
from .sequence import Sequence

SEQUENCE_TYPES: dict[str, type[Sequence]] = {
    "ar": ARSequence,
    "dlm": DLMSequence,
    "linear_spec": LinearSpecSequence,
}


def prefill(executor: Executor, seqs: list[Sequence]) -> None:
    """Causal passes over the prompts, committed; each sequence then takes its first token."""
    start = time.perf_counter()
    done = [0] * len(seqs)
    piece = executor.max_prefill_chunk
    while True:
        rows = [i for i, s in enumerate(seqs) if done[i] < len(s.prompt)]
        if not rows:
            break
        chunks = [Chunk(seqs[i].prompt[done[i] : done[i] + piece]) for i in rows]
        logits = executor.forward([seqs[i].slot for i in rows], chunks, all_logits=False)
        for r, i in enumerate(rows):
            executor.commit(seqs[i].slot, len(chunks[r].tokens))
            done[i] += len(chunks[r].tokens)
            if done[i] == len(seqs[i].prompt):
                seqs[i].stats.nfe += 1
                seqs[i].start(logits[r])
    elapsed = time.perf_counter() - start
    for s in seqs:
        s.stats.prefill_s = elapsed


def step(executor: Executor, seqs: list[Sequence]) -> None:
    """One decoding step for every sequence: one forward per distinct chunk length."""
    chunks = [s.next_chunk() for s in seqs]
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(len(c.tokens), []).append(i)
    for rows in by_len.values():
        logits = executor.forward([seqs[i].slot for i in rows], [chunks[i] for i in rows])
        for r, i in enumerate(rows):
            s = seqs[i]
            s.stats.nfe += 1
            executor.commit(s.slot, s.consume(logits[r, : len(chunks[i].tokens)]))


def run(
    executor: Executor,
    sequences: Iterable[Sequence],
    on_step: Callable[[Sequence], None] | None = None,
) -> list[Sequence]:
    """Decode every sequence to completion, at most `executor.max_batch` at a time."""
    waiting = deque(sequences)
    everything = list(waiting)
    active: list[Sequence] = []
    started: dict[int, float] = {}
    try:
        while waiting or active:
            joining = []
            while waiting and executor.free_slots:
                s = waiting.popleft()
                s.slot = executor.allocate()
                joining.append(s)
            if joining:
                prefill(executor, joining)
                now = time.perf_counter()
                for s in joining:
                    started[id(s)] = now
                active += joining
            else:
                step(executor, active)
            still = []
            for s in active:
                if on_step is not None:
                    on_step(s)
                if s.done:
                    s.stats.decode_s = time.perf_counter() - started[id(s)]
                    executor.release(s.slot)
                else:
                    still.append(s)
            active = still
    finally:
        for s in active:
            executor.release(s.slot)
    return everything
