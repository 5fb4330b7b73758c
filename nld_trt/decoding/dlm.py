"""Mode `dlm`: block diffusion with a confidence threshold (Fast-dLLM style, exact to the spec).

Per block: [t0, MASK x (B-1)] at the next B positions; block passes (not committed) fill the most
confident masked position and every other one at or above the threshold, until no MASK remains among the
positions that will be returned (the block's part within max_new_tokens, cut after the first EOS); then one
causal pass commits the block and its last logits give the next block's t0. Filled positions never change.

Two things the reference does differently without changing any returned token: it denoises positions
beyond max_new_tokens (we stop once every returned position is decided; the fill order of the earlier
positions is the same), and it runs the commit pass of the final block (we skip it: it only yields the
next block's first token). NFE counts the passes that run.

One thing it does differently on purpose: the thinking budget writes end-think at the budget's offset when
the block starts, and we take it back out (the position is denoised like any other) as soon as an earlier
position of the same block is filled with end-think, so thinking never ends twice.
"""

from __future__ import annotations

import torch

from ..executors.base import Chunk
from .bad_words import tail
from .select import candidates, dlm_fill, law
from .sequence import Sequence


class DLMSequence(Sequence):
    mode = "dlm"

    def start(self, last_logits: torch.Tensor) -> None:
        self._begin_block(last_logits)

    def _begin_block(self, logits: torch.Tensor) -> None:
        """Draw the next block's first token from the last causal logits, then open the block."""
        self.emit_next(logits)
        if not self.done:
            self._open_block()

    def _open_block(self, block_length: int | None = None) -> None:
        """A block [t0, MASK x (B-1)] at the next positions, t0 being the last token emitted."""
        t0 = self.out[-1]
        self.block_start = len(self.out) - 1  # output index of t0
        b = self.block_len = block_length or self.params.block_length
        self.block = torch.full((b,), self.mask_id, dtype=torch.long)
        self.block[0] = t0
        self.fixed = torch.zeros(b, dtype=torch.bool)
        self.fixed[0] = True
        self.laws: list[torch.Tensor | None] = [None] * b  # the law each position was filled from
        self.forced_at = None  # block position of a forced end-think
        m = self.params.max_thinking_tokens
        if m is not None and 0 < m - self.block_start < b and self.forced(m) is not None:
            self.forced_at = m - self.block_start
            self.block[self.forced_at] = self.params.end_think_token_id
            self.fixed[self.forced_at] = True
        self.passes = 0
        self.committing = False
        if self._decided():
            self._finish_block()

    def _decided(self) -> bool:
        """No MASK left among the positions this block will return."""
        limit = min(self.block_len, self.params.max_new_tokens - self.block_start)
        filled = self.fixed[:limit]
        if self.eos:
            is_eos = torch.tensor([int(t) in self.eos for t in self.block[:limit]]) & filled
            if is_eos.any():
                limit = int(is_eos.nonzero()[0, 0]) + 1
        return bool(self.fixed[:limit].all())

    def _finish_block(self) -> None:
        self.stats.passes_per_block.append(self.passes)
        laws = None
        if self.params.logprobs:
            if self.forced_at is not None:
                self.laws[self.forced_at] = self.point_law(self.params.end_think_token_id)
            # positions left masked lie past an EOS or max_new_tokens, where append stops
            decided = [p for p in self.laws[1:] if p is not None]
            laws = torch.stack(decided) if decided else None
        self.append(self.block[1:].tolist(), laws)
        self.committing = not self.done

    def _without_conflicts(self, fill: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """The fills of this pass minus those that would complete a banned word together with another fill of
        the same pass (kept in confidence order; the most confident is always kept)."""
        rows = fill.nonzero()[:, 0].tolist()
        if len(rows) < 2:
            return fill
        before = tail(self.prompt, self.out, self.bad_words.reach + 1)[:-1]
        known = before + [None if t == self.mask_id else t for t in self.block.tolist()]
        order = sorted(range(len(rows)), key=lambda i: -float(conf[rows[i]]))
        keep = self.bad_words.drop_conflicts(known, [len(before) + 1 + j for j in rows],
                                             [int(tokens[j]) for j in rows], order)
        out = fill.clone()
        for i, j in enumerate(rows):
            out[j] = keep[i]
        return out

    @property
    def chunk_length(self) -> int:
        return self.block_len

    @property
    def fill_threshold(self) -> float:
        return self.params.threshold

    def next_chunk(self) -> Chunk:
        # the commit pass is read at its last position only (the next block's first token)
        return Chunk(self.block.tolist(), block=not self.committing, last_logits_only=self.committing)

    def consume(self, logits: torch.Tensor) -> int:
        if self.committing:
            b = self.block_len
            self._begin_block(logits[b - 1])
            return b
        self.passes += 1
        rows = self.shaped(self.align(logits), self.block_start + 1, self.block, causal=False)
        tokens, conf = candidates(rows, self.sampling, self.generator)
        masked = ~self.fixed[1:]
        fill = dlm_fill(masked, conf, self.fill_threshold,
                        fill_all=self.passes >= min(self.params.steps_per_block, self.block_len))
        if self.bad_words.multi:
            fill = self._without_conflicts(fill, tokens, conf)
        self.block[1:][fill] = tokens[fill]
        self.fixed[1:] |= fill
        if self.params.logprobs:
            pass_laws = law(rows, self.sampling).cpu()
            for j in fill.nonzero()[:, 0].tolist():
                self.laws[j + 1] = pass_laws[j]
        end = self.params.end_think_token_id
        if self.forced_at is not None and bool((self.block[1 : self.forced_at] == end).any()):
            # thinking already ended earlier in this block: the budget's end-think is not needed
            self.block[self.forced_at] = self.mask_id
            self.fixed[self.forced_at] = False
            self.forced_at = None
        if self._decided():
            self._finish_block()
        return 0
