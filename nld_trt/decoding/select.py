"""Token selection from logits: candidates and confidences, the dlm fill rule, linear_spec acceptance.

Plain PyTorch over [N, V] float32 logits; these are the reference semantics of the GPU selection kernels.
"""

from __future__ import annotations

import torch


def candidates(
    logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token and its confidence (softmax probability) per row of [N, V] logits.

    temperature 0: argmax. temperature > 0: the Gumbel-max rule of the reference, argmax of
    exp(logit) / (-log u)^temperature in float64, evaluated in the log domain (same argmax, no overflow):
    this samples from softmax(logits / temperature).
    """
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
        noisy = logits.double() - temperature * torch.log(-torch.log(u))
        tokens = noisy.argmax(-1)
    else:
        tokens = logits.argmax(-1)
    conf = torch.softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0]
    return tokens, conf


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
) -> list[int]:
    """Distribution-preserving speculative sampling over one chunk.

    draft [B] (chunk tokens, draft[0] is the known token), drafted [B] bool (False: left as MASK),
    p_draft / p_verify [B, V] probabilities; p_verify[j] is the verifier's distribution of the token after
    draft[0..j], p_draft[j] the drafter's distribution of draft[j]. Accept draft[j+1] with probability
    min(1, p_verify[j][x] / p_draft[j+1][x]); on rejection resample from norm(max(0, p_verify - p_draft));
    after B-1 acceptances take a bonus token from p_verify[B-1]. Returns the accepted tokens.
    """
    out: list[int] = []
    b = draft.shape[0]
    for j in range(b - 1):
        x = int(draft[j + 1])
        pv, pd = p_verify[j], p_draft[j + 1]
        if drafted[j + 1]:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if u * float(pd[x]) <= float(pv[x]):  # u < p_v / p_d without dividing by zero
                out.append(x)
                continue
            residual = (pv - pd).clamp_min(0)
            dist = residual if float(residual.sum()) > 0 else pv
        else:
            dist = pv
        out.append(int(torch.multinomial(dist.double().cpu(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p_verify[b - 1].double().cpu(), 1, generator=generator)))
    return out
