"""Quantized vs original on held-out prompts: logits under both attention patterns, and every decoding mode.

Measured per model (`snapshot`), then compared (`compare`):
- logit cosine and greedy next-token agreement on teacher-forced causal passes (prompt + reference answer)
  and on `linear_spec` draft passes (`[t, MASK x (B-1)]` after a causal context, LoRA drafter on);
- per mode (`ar`, `dlm`, `linear_spec`): accuracy against the reference answers when they have one, TPF
  (generated tokens / forward passes, drafts and verifies counted), mean accepted length, and how many
  outputs are token-for-token those of the original.
The recipe's gates turn a TPF or accuracy drop into a warning: a quantized drafter that silently stops
being accepted keeps greedy outputs correct (linear_spec stays lossless) while losing the speed-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import NLDConfig
from ..decoding import SEQUENCE_TYPES, GenerationParams, run
from ..executors import TorchExecutor
from ..model import NLDModel
from .calib_data import CalibPass, Record, encode_record, extract_answer
from .recipes import Recipe

MODES = ("ar", "dlm", "linear_spec")
SPEED_MODES = ("dlm", "linear_spec")
MAX_CAUSAL_PROBES = 64  # logit positions kept per example
PROBE_BYTES = 1 << 28  # float32 logits kept per pattern: 512 positions at the releases' 131k vocabulary


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    answer: list[int]  # the reference continuation (+ EOS), for teacher-forced probes
    gold: str | None


def scoring() -> tuple[Callable[[str], str | None], Callable[[str, str], bool]]:
    """(gold answer of an answer field, whether an output answers it): `nld_trt.evaluate`'s, so the
    accuracy here is the accuracy `nld-trt eval` reports; a final-answer match where that module is absent."""
    try:
        from ..evaluate import gold_answer, is_correct
    except ImportError:
        return extract_answer, lambda text, gold: extract_answer(text) == gold
    return gold_answer, is_correct


def make_examples(records: list[Record], tokenizer, eos_id: int | None) -> list[Example]:
    gold_of, _ = scoring()
    out = []
    for r in records:
        prompt, answer = encode_record(r, tokenizer, eos_id)
        if not prompt:  # plain text: its first half is the prompt
            half = max(1, len(answer) // 2)
            prompt, answer = answer[:half], answer[half:]
        out.append(Example(prompt, answer, gold_of(r.answer) if r.answer is not None else None))
    return out


@dataclass
class ModeStats:
    outputs: list[list[int]]
    tokens: int
    nfe: int
    accepted: list[int]
    correct: int | None  # None when the examples have no reference answers

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0

    @property
    def mean_accepted(self) -> float | None:
        return sum(self.accepted) / len(self.accepted) if self.accepted else None

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else 100.0 * self.correct / len(self.outputs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tpf": round(self.tpf, 4),
            "mean_accepted": _r(self.mean_accepted),
            "accuracy": _r(self.accuracy),
            "tokens": self.tokens,
            "nfe": self.nfe,
        }


@dataclass
class Snapshot:
    causal: torch.Tensor  # [N, V] probe logits
    block: torch.Tensor  # [M, V]
    modes: dict[str, ModeStats] = field(default_factory=dict)


def _probes(config: NLDConfig, examples: list[Example], block_length: int, lora: bool) -> list[tuple[CalibPass, slice]]:
    """(pass, logit rows kept) for every example: one causal and one draft pass."""
    out = []
    for ex in examples:
        full = ex.prompt + ex.answer
        first = len(ex.prompt) - 1  # the logits that predict the answer's tokens
        out.append((CalibPass("causal", tuple(full), 0), slice(first, min(len(full), first + MAX_CAUSAL_PROBES))))
        if ex.answer:
            k = len(ex.answer) // 3
            ctx = ex.prompt + ex.answer[:k]
            chunk = [ex.answer[k]] + [config.mask_token_id] * (block_length - 1)
            out.append((CalibPass("draft", tuple(ctx + chunk), len(ctx), lora), slice(len(ctx) + 1, None)))
    return out


@torch.no_grad()
def probe_logits(
    model: NLDModel, config: NLDConfig, examples: list[Example], block_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the probed positions, per pattern, up to PROBE_BYTES each (the same prefix for both models)."""
    device = next(model.parameters()).device
    budget = max(16, PROBE_BYTES // (4 * config.vocab_size))
    kept: dict[str, list[torch.Tensor]] = {"causal": [], "draft": []}
    for p, rows in _probes(config, examples, block_length, model.has_lora):
        if sum(t.shape[0] for t in kept[p.kind]) >= budget:
            continue
        tokens, positions, mask, lora_rows = p.inputs(device)
        kept[p.kind].append(model.logits(model(tokens, positions, mask, None, lora_rows))[0, rows].float().cpu())
    empty = torch.empty(0, config.vocab_size)
    causal, block = (torch.cat(kept[k])[:budget] if kept[k] else empty for k in ("causal", "draft"))
    return causal, block


def run_mode(
    model: NLDModel,
    config: NLDConfig,
    prompts: list[list[int]],
    mode: str,
    max_new_tokens: int,
    block_length: int,
    max_batch: int = 8,
):
    """Greedy decoding of every prompt in one mode on the PyTorch executor; returns the finished sequences."""
    params = GenerationParams(mode=mode, max_new_tokens=max_new_tokens, block_length=block_length).resolved(config)
    max_len = max(len(p) for p in prompts) + max_new_tokens + block_length + 1
    executor = TorchExecutor(model, max_batch, max_len, max(block_length, 1))
    params.validate(config, executor.max_chunk)
    seqs = [SEQUENCE_TYPES[mode](p, params, config, i) for i, p in enumerate(prompts)]
    return run(executor, seqs)


def snapshot(
    model: NLDModel,
    config: NLDConfig,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    block_length: int,
    max_batch: int = 8,
    modes: tuple[str, ...] = MODES,
    scorer: Callable[[str, str], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Snapshot:
    """Everything `compare` needs from one model."""
    scorer = scorer or scoring()[1]
    causal, block = probe_logits(model, config, examples, block_length)
    snap = Snapshot(causal, block)
    graded = all(ex.gold is not None for ex in examples)
    for mode in modes:
        if progress:
            progress(mode)
        seqs = run_mode(model, config, [ex.prompt for ex in examples], mode, max_new_tokens, block_length, max_batch)
        correct = None
        if graded:
            correct = sum(scorer(tokenizer.decode(s.out), ex.gold) for s, ex in zip(seqs, examples))
        snap.modes[mode] = ModeStats(
            outputs=[list(s.out) for s in seqs],
            tokens=sum(s.stats.tokens for s in seqs),
            nfe=sum(s.stats.nfe for s in seqs),
            accepted=[a for s in seqs for a in s.stats.accepted_per_step],
            correct=correct,
        )
    return snap


def _logit_stats(ref: torch.Tensor, q: torch.Tensor) -> dict[str, float | None]:
    if ref.numel() == 0:
        return {"cosine": None, "agreement": None, "positions": 0}
    cos = torch.nn.functional.cosine_similarity(ref.double(), q.double(), dim=-1)
    agree = (ref.argmax(-1) == q.argmax(-1)).double()
    return {
        "cosine": round(float(cos.mean()), 6),
        "min_cosine": round(float(cos.min()), 6),
        "agreement": round(float(agree.mean()), 4),
        "positions": int(ref.shape[0]),
    }


def compare(ref: Snapshot, quant: Snapshot, recipe: Recipe) -> dict[str, Any]:
    """The report: logit fidelity, per-mode figures of both models, the gates and their warnings."""
    report: dict[str, Any] = {
        "logits": {"causal": _logit_stats(ref.causal, quant.causal), "block": _logit_stats(ref.block, quant.block)},
        "modes": {},
        "gates": {"tpf_drop": recipe.tpf_drop, "accuracy_drop_points": recipe.accuracy_drop_points},
        "warnings": [],
    }
    warnings: list[str] = report["warnings"]
    for mode, r in ref.modes.items():
        q = quant.modes[mode]
        same = sum(a == b for a, b in zip(r.outputs, q.outputs)) / max(1, len(r.outputs))
        entry = {"original": r.as_dict(), "quantized": q.as_dict(), "same_output": round(same, 4)}
        report["modes"][mode] = entry
        if mode in SPEED_MODES and r.tpf > 0:
            drop = 1.0 - q.tpf / r.tpf
            entry["tpf_drop"] = round(drop, 4)
            if drop > recipe.tpf_drop:
                extra = ""
                if r.mean_accepted is not None and q.mean_accepted is not None:
                    extra = f", mean accepted {r.mean_accepted:.2f} -> {q.mean_accepted:.2f}"
                warnings.append(
                    f"{mode}: TPF fell {100 * drop:.1f}% ({r.tpf:.3f} -> {q.tpf:.3f}{extra}), more than the "
                    f"{100 * recipe.tpf_drop:.0f}% the {recipe.qformat} recipe allows: the quantized "
                    + (
                        "drafter is accepted less often"
                        if mode == "linear_spec"
                        else "model decides fewer tokens per pass"
                    )
                )
        if r.accuracy is not None and q.accuracy is not None:
            fall = r.accuracy - q.accuracy
            entry["accuracy_drop_points"] = round(fall, 2)
            if fall > recipe.accuracy_drop_points:
                warnings.append(
                    f"{mode}: accuracy fell {fall:.1f} points ({r.accuracy:.1f}% -> {q.accuracy:.1f}%), more than "
                    f"the {recipe.accuracy_drop_points:g} the {recipe.qformat} recipe allows"
                )
    report["accuracy_measured"] = any(m.accuracy is not None for m in ref.modes.values())
    report["passed"] = not warnings
    return report


def _r(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)
