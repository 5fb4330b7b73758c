"""Banned words (`bad_words`, TensorRT-LLM's and vLLM's name): token-id sequences no output may complete.

A token is banned at a position when placing it there would make a banned word appear in full among the
tokens already decided around that position; its probability is then zero in the law the position is drawn
from (its logit -inf, before temperature and the sampling filters). What "decided around the position" is
depends on how the position is drawn:

- causal (every `ar` step, the first token after the prefill or a `dlm` commit, the `linear_spec` verifier's
  law at every chunk position): the tokens before it, i.e. the prompt, the output emitted so far and, in a
  verify, the draft tokens before the position. A verify row is only used when those drafts were accepted,
  so it is the law given the prefix actually emitted, exactly as `ar` draws it.
- bidirectional (a `dlm` denoising pass, a `linear_spec` draft pass): the prompt and output before the
  block, and the block's positions on both sides that are filled (not MASK) when the pass runs. A word
  through a still-masked position cannot be completed yet.

`dlm` fills several positions per pass: two of them could complete a word together, so `drop_conflicts`
keeps, in fill order, only fills that complete no word with the fills before them (the most confident one is
always kept: it was drawn from the law with the pre-pass state). `linear_spec` drafts need no such step: the
verifier gives a completing token zero probability, so it is never accepted, and the speculative rule stays
exact because the draft law q' is the law each draft token was actually drawn from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

NEG_INF = float("-inf")


class BadWords:
    """The banned words of one request, indexed for the two lookups (causal and bidirectional)."""

    def __init__(self, words: Iterable[Sequence[int]]) -> None:
        self.words = tuple(dict.fromkeys(tuple(int(t) for t in w) for w in words if len(w)))
        self.single = sorted({w[0] for w in self.words if len(w) == 1})
        # (length, offset of the position) -> the other tokens of the window -> tokens banned at that offset
        self.index: dict[tuple[int, int], dict[tuple[int, ...], set[int]]] = {}
        for w in self.words:
            if len(w) < 2:
                continue
            for o in range(len(w)):
                self.index.setdefault((len(w), o), {}).setdefault(w[:o] + w[o + 1:], set()).add(w[o])
        self.reach = max((len(w) for w in self.words), default=1) - 1  # tokens of context a lookup needs

    def __bool__(self) -> bool:
        return bool(self.words)

    @property
    def multi(self) -> bool:
        return bool(self.index)

    def banned(self, known: Sequence[int | None], position: int, causal: bool) -> set[int]:
        """Tokens of the multi-token words banned at `position` of `known` (None: not decided; a position at or
        past the end is not decided either). `causal`: only the tokens before the position count."""
        out: set[int] = set()
        n = len(known)
        for (length, offset), table in self.index.items():
            if causal and offset != length - 1:
                continue
            start = position - offset
            if start < 0 or start + length > max(n, position + 1):
                continue
            others = []
            for i in range(start, start + length):
                if i == position:
                    continue
                t = known[i] if i < n else None
                if t is None:
                    break
                others.append(t)
            else:
                out |= table.get(tuple(others), set())
        return out

    def mask(self, logits: torch.Tensor, known: Sequence[int | None], positions: Sequence[int],
             causal: bool) -> torch.Tensor:
        """Logits [N, V] with every banned token of row r (about position positions[r] of `known`) at -inf."""
        logits = logits.clone()
        if self.single:
            logits[:, self.single] = NEG_INF
        if self.multi:
            for r, p in enumerate(positions):
                ban = self.banned(known, p, causal)
                if ban:
                    logits[r, sorted(ban)] = NEG_INF
        return logits

    def drop_conflicts(self, known: list[int | None], positions: list[int], tokens: list[int],
                       order: list[int]) -> list[bool]:
        """Fills of one bidirectional pass, in `order` (most confident first): whether each (row r: `tokens[r]`
        at `positions[r]`) is kept, i.e. completes no banned word with `known` and the fills kept before it."""
        known = list(known)
        keep = [False] * len(tokens)
        for r in order:
            if not self.multi or tokens[r] not in self.banned(known, positions[r], causal=False):
                keep[r] = True
                known[positions[r]] = tokens[r]
        return keep


def tail(prompt: list[int], out: list[int], n: int) -> list[int]:
    """The last n tokens of prompt + out, without building the whole list."""
    if n <= 0:
        return []
    if len(out) >= n:
        return out[len(out) - n:]
    return prompt[max(len(prompt) - (n - len(out)), 0):] + out
