"""Batched adapters over the reference selection rules (nld_trt.decoding.select), row by row."""

from __future__ import annotations

import torch

from nld_trt.decoding.select import accept_greedy, candidates, dlm_fill


def reference_spec_accept(draft: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [B], next_token [B]) from candidates() and accept_greedy() per sequence."""
    accepted, next_token = [], []
    for d, lg in zip(draft, logits):
        verify, _ = candidates(lg.float())
        n = accept_greedy(d.long(), verify)
        accepted.append(n + 1)
        next_token.append(int(verify[n]))
    return torch.tensor(accepted), torch.tensor(next_token)


def reference_dlm_select(
    logits: torch.Tensor, masked: torch.Tensor, threshold: float, fill_all: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, confidences, fill) from candidates() and dlm_fill() per sequence."""
    rows = []
    for lg, m, fa in zip(logits, masked, fill_all):
        tokens, conf = candidates(lg.float())
        rows.append((tokens, conf, dlm_fill(m.bool(), conf, threshold, bool(fa))))
    return tuple(torch.stack(parts) for parts in zip(*rows))
