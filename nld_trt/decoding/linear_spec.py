"""Mode `linear_spec`: linear self-speculation, a block-diffusion draft verified by a causal pass.

Per step: draft the chunk d = [t, MASK x (B-1)] with block passes (LoRA drafter on, not committed); verify
the same chunk, now [t, x1..x_{B-1}], in one causal pass with the plain weights; accept the n leading drafts
the verifier agrees with plus its own next token, commit n + 1 chunk positions, and the verifier's last
accepted token becomes the next t. Greedy, the output equals greedy `ar` token for token.

Drafting: with threshold 0, one block pass fills every position. With threshold > 0 the default (`draft=
"repeat"`, the current reference) repeats block passes until no MASK is left, each filling the masked
positions whose confidence is at or above the threshold and at least the most confident one; every pass
counts as an NFE. `draft="once"` (an older release) drafts one pass and leaves the rest as MASK, which the
verifier then fills.

At temperature > 0 both acceptance rules are exact (every emitted token follows the verifier's law, the
filtered one when top-k/top-p/min-p are set, given the emitted prefix): `acceptance="official"` samples draft
and verify tokens independently and accepts on equality (the reference); `acceptance="speculative"` (the
default) accepts a draft x with probability min(1, p(x) / q(x)) and resamples from the residual, which
accepts more often. For it to be exact with threshold > 0, which positions a pass fills must not depend on
the tokens that pass drew: its confidence is then each position's highest probability under the draft's law
(the same as the drawn token's confidence when greedy), and `accept_speculative` falls back to the equality
rule at a position drafted before an earlier one.
"""

from __future__ import annotations

import torch

from ..executors.base import Chunk
from .select import accept_greedy, accept_speculative, candidates, law
from .sequence import Sequence


class LinearSpecSequence(Sequence):
    mode = "linear_spec"

    def start(self, last_logits: torch.Tensor) -> None:
        self.t = self.emit_next(last_logits)
        self._new_draft()

    @property
    def _speculative(self) -> bool:
        return not self.sampling.greedy and self.params.acceptance == "speculative"

    def _new_draft(self, block_length: int | None = None) -> None:
        b = self.block_len = block_length or self.params.block_length
        self.draft = torch.full((b,), self.mask_id, dtype=torch.long)
        self.draft[0] = self.t
        self.drafted = torch.zeros(b, dtype=torch.bool)
        self.drafted[0] = True
        self.order = [0] * b  # the draft pass that filled each position
        self.p_draft: torch.Tensor | None = None  # speculative: row j, the law draft[j] was drawn from
        self.passes = 0
        self.verifying = False

    @property
    def chunk_length(self) -> int:
        return self.block_len

    def next_chunk(self) -> Chunk:
        if self.verifying:
            return Chunk(self.draft.tolist(), block=False, lora=False)
        return Chunk(self.draft.tolist(), block=True, lora=self.params.lora)

    def consume(self, logits: torch.Tensor) -> int:
        if not self.verifying:
            self._draft_pass(logits)
            return 0
        committed = self._verify(logits)
        if not self.done:
            self._new_draft()
        return committed

    def _draft_pass(self, logits: torch.Tensor) -> None:
        self.passes += 1
        first = len(self.out)
        # about chunk positions 1..B-1, output indices len(out)..; bad words see the filled draft positions
        rows = self.shaped(self.align(logits), first, self.draft, causal=False)
        tokens, conf = candidates(rows, self.sampling, self.generator)
        if not self.sampling.greedy:
            q = law(rows, self.sampling)  # the law the candidates were drawn from
            conf = q.max(-1).values if self._speculative else q.gather(-1, tokens[:, None])[:, 0]
        masked = ~self.drafted[1:]
        threshold, repeat = self.params.threshold, self.params.draft == "repeat"
        if threshold <= 0:
            fill = masked
        elif repeat:
            fill = masked & (conf.cpu() >= threshold)
            if not fill.any():
                fill[torch.where(masked, conf.cpu().float(), torch.tensor(-1.0)).argmax()] = True
        else:
            fill = masked & (conf.cpu() > threshold)
        self.draft[1:][fill] = tokens.cpu()[fill]
        self.drafted[1:] |= fill
        for j in fill.nonzero()[:, 0].tolist():
            self.order[j + 1] = self.passes
        if self._speculative:
            if self.p_draft is None:
                self.p_draft = torch.zeros(self.draft.shape[0], q.shape[-1], dtype=torch.float64, device=q.device)
            self.p_draft[1:][fill.to(q.device)] = q[fill.to(q.device)]
        if threshold <= 0 or not repeat or bool(self.drafted.all()):
            self.verifying = True
            self.stats.draft_passes_per_step.append(self.passes)

    def _verify(self, logits: torch.Tensor) -> int:
        first = len(self.out)  # output index of the verifier's token after draft[0]
        # row j: the token after draft[0..j], banned words seen through the draft tokens before it only
        rows = self.shaped(logits, first, self.draft, causal=True)
        if self._speculative:
            p = law(rows, self.sampling)
            accepted = accept_speculative(self.draft, self.drafted, self.p_draft, p, self.generator, self.order)
        else:
            a = candidates(rows, self.sampling, self.generator)[0].cpu()
            accepted = a[: accept_greedy(self.draft, a) + 1].tolist()
            p = law(rows, self.sampling) if self.params.logprobs else None
        self.matches = len(accepted) - 1  # drafts the verifier accepted, for acceptance estimates
        m = self.params.max_thinking_tokens
        forced = None
        if m is not None and first <= m < first + len(accepted):
            forced = self.forced(m, before=self.out + accepted[: m - first])
            if forced is not None:
                accepted = accepted[: m - first] + [forced]
        laws = None
        if self.params.logprobs:
            laws = p[: len(accepted)].cpu().clone()
            if forced is not None:
                laws[-1] = self.point_law(forced)
        # what this step added to the output (tokens accepted past an EOS or max_new_tokens are not counted)
        self.stats.accepted_per_step.append(self.append(accepted, laws))
        self.t = accepted[-1]
        return len(accepted)
