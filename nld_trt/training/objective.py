"""NLD's joint training objective in one forward pass: a clean copy (causal, AR loss) and a noisy copy
(block diffusion, masked-token loss) of every sequence, concatenated along time.

Row layout: `[clean copy | noisy copy]`, each right-padded to the batch's longest. The clean copy is the
sequence (prompt, solution ending in EOS). The noisy copy holds only the blocks that cover the solution
(the last one filled up with EOS), at the same absolute positions as the clean copy; in each block some
tokens (never the block's first, which decoding always knows) are replaced by the mask token. Who sees whom:
- a clean token sees the clean tokens at or before its position (causal);
- a noisy token sees every noisy token of its own block (bidirectional) and the clean tokens before its
  block: exactly what a block pass sees at inference, with the committed KV cache as the clean prefix;
- a padding slot sees only itself (so attention never has an empty row).
Alignment is llada: noisy logits at position j predict the token at j; clean logits at j predict j + 1.

Block boundaries take a random phase per sequence (half the time aligned with the solution's start, as in
`dlm`; otherwise anywhere, as in `linear_spec`, whose drafts start wherever the accepted text ends), and
often every token after the block's first is masked: that is the `linear_spec` draft `[t, MASK x (B-1)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LoRA, NLDModel

IGNORE = -100
PAD, CLEAN, NOISY = 0, 1, 2


@dataclass(frozen=True)
class MaskSchedule:
    """How the noisy copy is corrupted, per block: with probability `p_full` every maskable token
    (the `linear_spec` draft case), otherwise each with probability r ~ U(r_min, 1)."""

    p_full: float = 0.3
    r_min: float = 0.05
    p_aligned: float = 0.5  # block phase aligned with the solution's first token


@dataclass
class Example:
    prompt: list[int]  # chat-formatted prompt ids (BOS ... [/INST])
    answer: list[int]  # solution ids, ending with EOS


@dataclass
class JointBatch:
    tokens: torch.Tensor  # [N, S] long
    positions: torch.Tensor  # [N, S] long
    kind: torch.Tensor  # [N, S] PAD / CLEAN / NOISY
    block_start: torch.Tensor  # [N, S] absolute position where a noisy slot's block starts (-1 otherwise)
    ar_targets: torch.Tensor  # [N, S] next-token target of clean slots (IGNORE elsewhere)
    dlm_targets: torch.Tensor  # [N, S] the hidden token of masked noisy slots (IGNORE elsewhere)
    dlm_weights: torch.Tensor  # [N, S] float: 1 / mask ratio on masked noisy slots
    dlm_count: int  # maskable noisy slots in the batch (the dlm loss's normalizer)
    teacher: torch.Tensor  # [N, S] slot of the clean logits that predict a masked slot's token (-1: none)

    @property
    def mask(self) -> torch.Tensor:
        return joint_attention_mask(self.kind, self.positions, self.block_start)


def joint_attention_mask(kind: torch.Tensor, positions: torch.Tensor, block_start: torch.Tensor) -> torch.Tensor:
    """Boolean [N, 1, S, S]: True where query slot q may attend to key slot k (rules in the module doc)."""
    qk, kk = kind[:, :, None], kind[:, None, :]
    qp, kp = positions[:, :, None], positions[:, None, :]
    qb, kb = block_start[:, :, None], block_start[:, None, :]
    clean_causal = (qk == CLEAN) & (kk == CLEAN) & (kp <= qp)
    noisy_prefix = (qk == NOISY) & (kk == CLEAN) & (kp < qb)
    noisy_block = (qk == NOISY) & (kk == NOISY) & (kb == qb)
    eye = torch.eye(kind.shape[1], dtype=torch.bool, device=kind.device)[None]
    pad_self = (qk == PAD) & eye
    return (clean_causal | noisy_prefix | noisy_block | pad_self).unsqueeze(1)


def make_batch(
    examples: list[Example],
    block_size: int,
    mask_id: int,
    eos_id: int,
    generator: torch.Generator,
    schedule: MaskSchedule = MaskSchedule(),
) -> JointBatch:
    """Tokens, targets and weights of the joint pass for one batch (one block size for the batch)."""
    rows = [_row(e, block_size, mask_id, eos_id, generator, schedule) for e in examples]
    tc = max(len(r["clean"]) for r in rows)
    tn = max(len(r["noisy"]) for r in rows)
    n, s = len(rows), tc + tn
    out = {
        "tokens": torch.full((n, s), eos_id, dtype=torch.long),
        "positions": torch.zeros((n, s), dtype=torch.long),  # padding slots sit at 0, seen by no one
        "kind": torch.full((n, s), PAD, dtype=torch.long),
        "block_start": torch.full((n, s), -1, dtype=torch.long),
        "ar_targets": torch.full((n, s), IGNORE, dtype=torch.long),
        "dlm_targets": torch.full((n, s), IGNORE, dtype=torch.long),
        "dlm_weights": torch.zeros((n, s)),
        "teacher": torch.full((n, s), -1, dtype=torch.long),
    }
    count = 0
    for i, r in enumerate(rows):
        lc, ln = len(r["clean"]), len(r["noisy"])
        c, z = slice(0, lc), slice(tc, tc + ln)
        out["tokens"][i, c] = torch.tensor(r["clean"])
        out["positions"][i, c] = torch.arange(lc)
        out["kind"][i, c] = CLEAN
        out["ar_targets"][i, c] = torch.tensor(r["ar_targets"])
        out["tokens"][i, z] = torch.tensor(r["noisy"])
        out["positions"][i, z] = torch.arange(r["start"], r["start"] + ln)
        out["kind"][i, z] = NOISY
        out["block_start"][i, z] = torch.tensor(r["block_start"])
        out["dlm_targets"][i, z] = torch.tensor(r["dlm_targets"])
        out["dlm_weights"][i, z] = torch.tensor(r["dlm_weights"])
        # the verifier's view of a masked solution token (none past EOS: decoding stops there)
        real = (out["dlm_targets"][i, z] != IGNORE) & (out["positions"][i, z] < lc)
        out["teacher"][i, z] = torch.where(real, out["positions"][i, z] - 1, -1)
        count += r["maskable"]
    return JointBatch(dlm_count=count, **out)


def _row(e: Example, b: int, mask_id: int, eos_id: int, g: torch.Generator, sch: MaskSchedule) -> dict:
    """One sequence: its clean tokens and AR targets, its noisy blocks, their targets and weights."""
    p, a = len(e.prompt), len(e.answer)
    if _uniform(g) < sch.p_aligned:
        start = p
    else:  # a random phase: the block holding the first solution token starts up to b - 1 before it
        start = max(p - int(torch.randint(0, b, (1,), generator=g)), 1)
    blocks = -(-(p + a - start) // b)
    end = start + blocks * b
    clean = e.prompt + e.answer  # no noisy block looks past its own start, so no padding here
    ar_targets = [IGNORE] * (p - 1) + e.answer + [IGNORE]
    padded = clean + [eos_id] * (end - p - a)  # the last block ends with EOS, as decoding sees it
    noisy, targets, weights, block_start = [], [], [], []
    maskable_total = 0
    for s in range(start, end, b):
        chunk = padded[s : s + b]
        maskable = [j for j in range(1, b) if s + j >= p]
        maskable_total += len(maskable)
        if _uniform(g) < sch.p_full:
            ratio, hide = 1.0, set(maskable)
        else:
            ratio = sch.r_min + (1 - sch.r_min) * _uniform(g)
            draw = torch.rand(len(maskable), generator=g) < ratio
            hide = {j for j, d in zip(maskable, draw.tolist()) if d}
            if not hide and maskable:
                hide = {maskable[int(torch.randint(0, len(maskable), (1,), generator=g))]}
        for j, tok in enumerate(chunk):
            noisy.append(mask_id if j in hide else tok)
            targets.append(tok if j in hide else IGNORE)
            weights.append(1.0 / ratio if j in hide else 0.0)
            block_start.append(s)
    return dict(clean=clean, ar_targets=ar_targets, noisy=noisy, dlm_targets=targets, dlm_weights=weights,
                block_start=block_start, start=start, maskable=maskable_total)


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


# The loss ---------------------------------------------------------------------------------------------

@dataclass
class Losses:
    total: torch.Tensor
    ar: float
    dlm: float


def joint_loss(model: NLDModel, batch: JointBatch, dlm_weight: float = 1.0) -> Losses:
    """AR cross-entropy on the clean copy + `dlm_weight` x masked-token cross-entropy (weighted 1 / mask
    ratio) on the noisy copy, from one forward pass."""
    logits = model.logits(model(batch.tokens, batch.positions, batch.mask)).float()
    ar = F.cross_entropy(logits.flatten(0, 1), batch.ar_targets.flatten(), ignore_index=IGNORE)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.dlm_targets.flatten(), ignore_index=IGNORE, reduction="none")
    dlm = (ce * batch.dlm_weights.flatten()).sum() / max(batch.dlm_count, 1)
    return Losses(ar + dlm_weight * dlm, ar.item(), dlm.item())


class PositionalLoRA(LoRA):
    """The draft adapter applied only at chosen slots ([N, S, 1] `where`): in training the noisy copy
    drafts with the adapter while the clean copy, the stand-in for the KV cache the verify passes
    wrote, runs on the plain weights, as at inference."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, where: torch.Tensor) -> None:
        super().__init__(A, B, scale)
        self.where = where

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return super().delta(x) * self.where.to(x.dtype)


def install_lora(model: NLDModel, layers: dict[int, tuple[torch.Tensor, torch.Tensor]], scale: float,
                 where: torch.Tensor | None) -> torch.Tensor | None:
    """Put trainable adapters on the model's o_proj (only at `where`); returns the `lora_rows` to pass
    to the forward, or None with `where` None (adapter removed)."""
    for i, layer in enumerate(model.encoder.layers):
        ab = layers.get(i) if where is not None else None
        layer.self_attn.lora = None if ab is None else PositionalLoRA(ab[0], ab[1], scale, where[..., None])
    return None if where is None else torch.ones(where.shape[0], dtype=torch.bool, device=where.device)


def draft_loss(model: NLDModel, batch: JointBatch, layers, scale: float) -> torch.Tensor:
    """The drafter's objective, base frozen: the noisy copy, adapter on, matches the verifier's (clean
    copy's, adapter off) next-token distribution at every masked slot. Matching the verifier rather than
    the data is what acceptance rewards: a draft is accepted when it equals the verifier's argmax."""
    rows = install_lora(model, layers, scale, batch.kind == NOISY)
    try:
        logits = model.logits(model(batch.tokens, batch.positions, batch.mask, lora_rows=rows)).float()
    finally:
        install_lora(model, layers, scale, None)
    sel = batch.teacher >= 0
    student = logits[sel]
    row = torch.arange(logits.shape[0])[:, None].expand_as(batch.teacher)[sel]
    teacher = torch.softmax(logits[row, batch.teacher[sel]].detach(), -1)
    ce = -(teacher * torch.log_softmax(student, -1)).sum(-1)
    return ce.mean()
