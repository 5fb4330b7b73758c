"""Mode `linear_spec`: linear self-speculation, a block-diffusion draft verified by a causal pass.

Per step: draft chunk d = [t, MASK x (B-1)] in one block pass (LoRA drafter on, not committed); verify the
same chunk, now [t, x1..x_{B-1}], in one causal pass with the plain weights; accept the n leading drafts
the verifier agrees with plus its own next token, commit n + 1 chunk positions, and the verifier's last
accepted token becomes the next t. Greedy, the output equals greedy `ar` token for token.

At temperature > 0, `acceptance="official"` samples draft and verify tokens independently and accepts on
equality (the reference's behaviour, not distribution-preserving); `acceptance="speculative"` uses
standard speculative sampling, which preserves the verifier's distribution.
"""

from __future__ import annotations

import torch

from ..executors.base import Chunk
from .select import accept_greedy, accept_speculative
from .sequence import Sequence


class LinearSpecSequence(Sequence):
    mode = "linear_spec"

    def start(self, last_logits: torch.Tensor) -> None:
        forced = self.forced(0)
        self.t = forced if forced is not None else int(self.pick(last_logits[None])[0][0])
        self.append([self.t])
        self.verifying = False

    def next_chunk(self) -> Chunk:
        if self.verifying:
            return Chunk(self.draft.tolist(), block=False, lora=False)
        b = self.params.block_length
        return Chunk([self.t] + [self.mask_id] * (b - 1), block=True, lora=self.params.lora)

    def consume(self, logits: torch.Tensor) -> int:
        if not self.verifying:
            self._draft(logits)
            return 0
        self.verifying = False
        return self._verify(logits)

    def _draft(self, logits: torch.Tensor) -> None:
        b = self.params.block_length
        tokens, conf = self.pick(self.align(logits))
        drafted = conf > self.params.threshold
        self.draft = torch.full((b,), self.mask_id, dtype=torch.long)
        self.draft[0] = self.t
        self.draft[1:] = torch.where(drafted.cpu(), tokens.cpu(), self.draft[1:])
        self.drafted = torch.cat([torch.ones(1, dtype=torch.bool), drafted.cpu()])
        if self.params.temperature > 0 and self.params.acceptance == "speculative":
            p = torch.softmax(self.align(logits).double() / self.params.temperature, -1)
            self.p_draft = torch.cat([torch.zeros_like(p[:1]), p])  # row j: the drafter's law of d_j
        self.verifying = True

    def _verify(self, logits: torch.Tensor) -> int:
        if self.params.temperature > 0 and self.params.acceptance == "speculative":
            p_verify = torch.softmax(logits.double() / self.params.temperature, -1)
            accepted = accept_speculative(self.draft, self.drafted, self.p_draft, p_verify, self.generator)
        else:
            a = self.pick(logits)[0].cpu()
            accepted = a[: accept_greedy(self.draft, a) + 1].tolist()
        start = len(self.out)
        m = self.params.max_thinking_tokens
        if m is not None and start <= m < start + len(accepted):
            forced = self.forced(m, before=self.out + accepted[: m - start])
            if forced is not None:
                accepted = accepted[: m - start] + [forced]
        # what this step added to the output (tokens accepted past an EOS or max_new_tokens are not counted)
        self.stats.accepted_per_step.append(self.append(accepted))
        self.t = accepted[-1]
        return len(accepted)
