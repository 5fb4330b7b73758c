"""Token selection from logits: the sampling law and its filters, candidates and confidences, the dlm fill
rule, linear_spec acceptance.

Plain PyTorch over [N, V] logits; these are the reference semantics of the GPU selection kernels.

The law a token is drawn from (`law`): greedy (temperature 0) is the argmax, and its reported law is the
plain softmax; otherwise softmax(logits / temperature) restricted to the filtered support and renormalised.
The filters run in this order on the tempered distribution: top-k (the k largest, ties at the k-th value
kept), top-p (the smallest set of most likely tokens whose mass reaches top_p), min-p (tokens whose
probability is at least min_p times the most likely one's). Greedy ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: temperature 0 is greedy; the filters apply only when sampling."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)


def support(logits: torch.Tensor, s: Sampling) -> torch.Tensor | None:
    """[N, V] bool: the tokens the filters keep (None: every token, no filter applies)."""
    if not s.filtered:
        return None
    z = logits.double() / s.temperature
    keep = torch.isfinite(z)
    if 0 < s.top_k < z.shape[-1]:
        kth = z.topk(s.top_k, dim=-1).values[..., -1:]
        keep &= z >= kth
    if s.top_p < 1.0:
        masked = z.masked_fill(~keep, float("-inf"))
        probs, order = torch.softmax(masked, -1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        keep_sorted = before < s.top_p
        keep_sorted[..., 0] = True
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    if s.min_p > 0.0:
        probs = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        keep &= probs >= s.min_p * probs.max(-1, keepdim=True).values
    return keep


def law(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """[N, V] float64 probabilities a token is drawn from (greedy: the plain softmax, see the module doc)."""
    z = logits.double() if s.greedy else logits.double() / s.temperature
    keep = support(logits, s)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, -1)


GREEDY = Sampling()


def candidates(
    logits: torch.Tensor, s: Sampling = GREEDY, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token and its confidence per row of [N, V] logits (the dlm rule).

    Greedy: argmax, confidence = its softmax probability. Sampling: the Gumbel-max rule of the reference,
    argmax of exp(logit) / (-log u)^temperature in float64 (evaluated in the log domain: same argmax, no
    overflow) over the filtered support, which samples from `law`; confidence = the candidate's probability
    under softmax(logits) renormalised over the support (with no filter: its plain softmax probability).
    """
    keep = support(logits, s)
    if not s.greedy:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
        noisy = logits.double() - s.temperature * torch.log(-torch.log(u))
        if keep is not None:
            noisy = noisy.masked_fill(~keep, float("-inf"))
        tokens = noisy.argmax(-1)
    else:
        tokens = logits.argmax(-1)
    base = logits.float() if keep is None else logits.float().masked_fill(~keep, float("-inf"))
    conf = torch.softmax(base, -1).gather(-1, tokens[:, None])[:, 0]
    return tokens, conf


def sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from the probabilities p [V]."""
    return int(torch.multinomial(p.double().cpu(), 1, generator=generator))


def dlm_fill(masked: torch.Tensor, conf: torch.Tensor, threshold: float, fill_all: bool = False) -> torch.Tensor:
    """Which positions a dlm denoising pass fills: among the still-masked ones, the most confident always,
    every other one whose confidence >= threshold (all of them when `fill_all`, the last allowed pass)."""
    fill = masked & (conf >= threshold) if not fill_all else masked.clone()
    if masked.any():
        best = torch.where(masked, conf, torch.full_like(conf, -1.0)).argmax()
        fill[best] = True
    return fill


def accept_greedy(draft: torch.Tensor, verify_tokens: torch.Tensor) -> int:
    """Leading matches n: verify_tokens[j] == draft[j + 1] for j = 0..n-1 (draft and verify are [B])."""
    mismatch = (verify_tokens[:-1] != draft[1:]).nonzero()
    return int(mismatch[0, 0]) if mismatch.numel() else draft.shape[0] - 1


def accept_speculative(
    draft: torch.Tensor,
    drafted: torch.Tensor,
    p_draft: torch.Tensor,
    p_verify: torch.Tensor,
    generator: torch.Generator | None,
    order: list[int] | None = None,
) -> list[int]:
    """Distribution-preserving speculative sampling over one chunk.

    draft [B] (chunk tokens, draft[0] is the known token), drafted [B] bool (False: left as MASK),
    p_draft / p_verify [B, V] probabilities; p_verify[j] is the verifier's law of the token after
    draft[0..j], p_draft[j] the law draft[j] was drawn from. Accept draft[j+1] with probability
    min(1, p_verify[j][x] / p_draft[j+1][x]); on rejection resample from norm(max(0, p_verify - p_draft));
    a position left as MASK proposes nothing, so its token comes from p_verify; after B-1 acceptances take
    a bonus token from p_verify[B-1]. Returns the accepted tokens.

    `order` (the draft pass that filled each position) covers drafts filled over several passes: the ratio
    test needs draft[k] drawn after (or with) every earlier position, since an earlier position drawn later
    was conditioned on draft[k], and accepting it tells something about draft[k]. Where that does not
    hold, position k uses the equality rule instead (draw from p_verify, accept on a match), which is exact
    whatever the draft; every emitted token then still follows p_verify given the emitted prefix.
    """
    out: list[int] = []
    b = draft.shape[0]
    latest = 0  # the latest pass among the positions before the one being decided
    for j in range(b - 1):
        k = j + 1
        x = int(draft[k])
        pv, pd = p_verify[j], p_draft[k]
        in_order = order is None or order[k] >= latest
        if order is not None:
            latest = max(latest, order[k])
        if drafted[k] and in_order:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if u * float(pd[x]) <= float(pv[x]):  # u < p_v / p_d without dividing by zero
                out.append(x)
                continue
            residual = (pv - pd).clamp_min(0)
            dist = residual if float(residual.sum()) > 0 else pv
        elif drafted[k]:
            y = sample(pv, generator)
            out.append(y)
            if y == x:
                continue
            return out
        else:
            dist = pv
        out.append(sample(dist, generator))
        return out
    out.append(sample(p_verify[b - 1], generator))
    return out


def top_logprobs(logp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely (token, log-probability) pairs of one row of log-probabilities."""
    if n <= 0:
        return []
    values, ids = logp.topk(min(n, logp.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids, values)]
