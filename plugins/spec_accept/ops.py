"""Torch entry points of the selection kernels (compiled on CUDA, or interpreted: plugins.interpret)."""

from __future__ import annotations

import torch

from ..dtypes import from_torch
from ..interpret import interpreting
from ..runtime import int32_on, last_dim_contiguous, launch
from . import launch as L


def spec_accept(
    draft: torch.Tensor, logits: torch.Tensor, config: L.SelectConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance of B draft chunks: draft [B, T] tokens, logits [B, T, V] of the verify pass.

    Returns int32 (accepted [B], next_token [B]): accepted = n + 1 with n the leading matches
    argmax(logits[b, j]) == draft[b, j + 1], next_token = argmax(logits[b, n]).
    """
    L.check_shapes(logits.shape, [draft.shape], [])
    logits = last_dim_contiguous(logits)
    draft = int32_on(draft, logits.device)
    b = logits.shape[0]
    cfg = config or L.select_config(interpreting())
    spec = L.accept_spec(from_torch(logits.dtype), cfg)
    accepted = torch.empty(b, dtype=torch.int32, device=logits.device)
    next_token = torch.empty_like(accepted)
    values = dict(zip(L.ACCEPT_INTS, L.accept_ints(logits.shape, draft.stride(), logits.stride())))
    values.update(DRAFT=draft, LOGITS=logits, ACCEPTED=accepted, NEXT_TOKEN=next_token)
    launch(spec, L.grid(b), values, logits.device.type)
    return accepted, next_token


def dlm_select(
    logits: torch.Tensor,
    masked: torch.Tensor,
    threshold: float,
    fill_all: torch.Tensor | bool = False,
    config: L.SelectConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dlm denoising decision for B blocks: logits [B, T, V], masked [B, T] (still MASK).

    Returns (tokens int32 [B, T], confidences fp32 [B, T], fill bool [B, T]); fill_all (bool or [B])
    marks rows on their last allowed pass, where every masked position is filled.
    """
    b, t, _ = logits.shape
    if isinstance(fill_all, bool):
        fill_all = torch.full((b,), fill_all)
    L.check_shapes(logits.shape, [masked.shape], [fill_all.numel()])
    logits = last_dim_contiguous(logits)
    masked = int32_on(masked, logits.device)
    cfg = config or L.select_config(interpreting())
    spec = L.select_spec(from_torch(logits.dtype), cfg)
    tokens = torch.empty(b, t, dtype=torch.int32, device=logits.device)
    conf = torch.empty(b, t, dtype=torch.float32, device=logits.device)
    fill = torch.empty(b, t, dtype=torch.int32, device=logits.device)
    values = dict(zip(L.SELECT_INTS, L.select_ints(logits.shape, logits.stride(), masked.stride())))
    values.update(
        LOGITS=logits, MASKED=masked, FILL_ALL=int32_on(fill_all, logits.device), threshold=float(threshold),
        TOKENS=tokens, CONF=conf, FILL=fill,
    )
    launch(spec, L.grid(b), values, logits.device.type)
    return tokens, conf, fill.bool()
