"""A scripted executor: logits from a deterministic rule instead of a network.

It keeps each sequence's tokens the way a paged KV cache keeps keys (written at L..L+n-1 of its pages), so
it checks that the decoding loops use only the executor interface and that the batcher's pages hold what
they should, and it makes drafts that are often but
not always right, so linear_spec accepts runs of every length (random networks almost never agree).
"""

from __future__ import annotations

import random

import torch

from nld_trt.executors.base import Executor
from nld_trt.kv.layout import KVLayout

V = 64
MASK = 63


def next_token(prefix: list[int]) -> int:
    """The 'true' continuation: a fixed function of the last two tokens and the length."""
    a, b = prefix[-1], prefix[-2] if len(prefix) > 1 else 0
    return (5 * a + 3 * b + len(prefix)) % 60 + 3  # never 0..2 (EOS is 2) nor MASK


class ScriptedExecutor(Executor):
    """Logits from a rule over each row's committed tokens, kept the way a paged KV cache keeps keys (written
    at L..L+n-1 of the row's pages, read back through its page table): `rows(context, chunk, block, lora)`
    gives the chunk's [n, vocab] logits, context being the tokens the row's pages hold before L. A batcher
    that hands out a wrong page, shares one it should not or reuses a prefix that is not there changes the
    context and so the logits."""

    vocab = V

    def __init__(self, config, max_batch: int, max_seq_len: int, max_chunk: int, page_size: int = 4,
                 kv_cache_tokens: int | None = None) -> None:
        layout = KVLayout.build(config, max_seq_len, torch.float32, page_size=page_size,
                                tokens=kv_cache_tokens or max_batch * max_seq_len)
        super().__init__(config, layout, max_batch, max_chunk=max_chunk)
        self.store = [[0] * page_size for _ in range(layout.pages + 1)]

    @property
    def has_lora(self) -> bool:
        return True

    def rows(self, context: list[int], chunk: list[int], block: bool, lora: bool) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, tokens, tables, chunk_lens, block, lora, committed, all_logits):
        b, t = tokens.shape
        p = self.layout.page_size
        logits = torch.zeros(b, t, self.vocab)
        for r in range(b):
            table, L, n = tables[r].tolist(), int(committed[r]), int(chunk_lens[r])
            chunk = tokens[r, :n].tolist()
            for j, tok in enumerate(chunk):
                self.store[table[(L + j) // p]][(L + j) % p] = tok
            context = [self.store[table[i // p]][i % p] for i in range(L)]
            logits[r, :n] = self.rows(context, chunk, bool(block[r]), bool(lora[r]))
        if not all_logits:
            return logits[torch.arange(b), chunk_lens - 1]
        return logits


class ToyExecutor(ScriptedExecutor):
    def __init__(self, config, max_batch=4, max_seq_len=512, miss_rate=0.15, dream=False, kv_cache_tokens=None):
        super().__init__(config, max_batch, max_seq_len, max_chunk=64, kv_cache_tokens=kv_cache_tokens)
        self.miss_rate = miss_rate
        self.dream = dream

    def rows(self, context, chunk, block, lora):
        L, n = len(context), len(chunk)
        ctx = context + chunk
        out = torch.zeros(n, V)
        for j in range(n):
            if not block:
                target = next_token(ctx[: L + j + 1])
                out[j] = self._peaked(target, 4.0 + (L + j) % 3)
                continue
            # block pass: position j's own token (llada) or j+1's (dream), guessed by unrolling the true
            # rule from the chunk's first token; wrong at a scripted subset of positions
            pos = j + 1 if self.dream else j
            if pos == 0:
                continue
            guess = ctx[: L + 1]
            for _ in range(pos):
                guess.append(next_token(guess))
            target = guess[-1]
            draw = random.Random((L + pos) * 7919 + pos).random()
            miss = draw < self.miss_rate / (3.0 if lora else 1.0)  # the LoRA drafter misses less
            if miss:
                target = (target + 7) % 60 + 3
            out[j] = self._peaked(target, 1.0 + (L * 7 + pos * 5) % 6)
        return out

    @staticmethod
    def _peaked(target: int, height: float) -> torch.Tensor:
        row = torch.zeros(V)
        row[target] = height
        row[(target + 1) % V] = height / 2
        return row
