"""Sampling laws: the filters shape the law every token is drawn from, and speculative acceptance keeps
`ar`'s law in `linear_spec`, with every filter and draft threshold (tests/law_executor.py: exact laws)."""

from __future__ import annotations

import pytest
import torch

from law_executor import CONFIG, MASK, V, LawExecutor, ar_law, draft_logits, filtered
from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.kv import PageManager

from law_executor import PROMPT_LAW as PROMPT
SEEDS = 4000


def first_tokens(mode: str, length: int, seeds: int = SEEDS, **kw) -> list[tuple[int, ...]]:
    params = GenerationParams(mode=mode, max_new_tokens=length, temperature=1.0, block_length=4, eos_token_ids=(),
                              **kw).resolved(CONFIG)
    params.validate(CONFIG, 8)
    seqs = [SEQUENCE_TYPES[mode](list(PROMPT), params, CONFIG, seed) for seed in range(seeds)]
    run(LawExecutor(max_batch=512), seqs)
    return [tuple(s.out) for s in seqs]


def chi_square_p(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    """p-value of Pearson's chi-square test of the samples against the law (cells of expected count < 5
    pooled); a sample outside the law's support gives 0."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        if s not in law:
            return 0.0
        counts[s] = counts.get(s, 0) + 1
    stat, cells, pool_obs, pool_exp = 0.0, 0, 0, 0.0
    for cell, p in law.items():
        if n * p < 5:
            pool_obs, pool_exp = pool_obs + counts.get(cell, 0), pool_exp + n * p
        else:
            stat += (counts.get(cell, 0) - n * p) ** 2 / (n * p)
            cells += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        cells += 1
    dof = torch.tensor((cells - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


FILTERS = [dict(top_k=2), dict(top_p=0.6), dict(min_p=0.3)]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: next(iter(f)))
def test_ar_samples_the_filtered_law(filters):
    samples = first_tokens("ar", 2, **filters)
    law = ar_law(PROMPT, 2, **filters)
    assert 3 <= len(law) < (V - 1) ** 2  # the filter removes something, and leaves something to test
    assert chi_square_p(samples, law) > 1e-3


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: next(iter(f)))
def test_linear_spec_speculative_keeps_the_filtered_ar_law(filters):
    assert chi_square_p(first_tokens("linear_spec", 3, **filters), ar_law(PROMPT, 3, **filters)) > 1e-3


@pytest.mark.parametrize("threshold, draft, acceptance, seeds", [
    # 0.7 drafts over several passes, often out of order: without the equality fallback of
    # accept_speculative this case fails (p ~ 1e-4 at 6,000 seeds, 7e-8 at 12,000)
    (0.7, "repeat", "speculative", 8000), (0.3, "once", "speculative", SEEDS), (0.3, "repeat", "official", SEEDS),
])
def test_linear_spec_keeps_the_ar_law_with_a_draft_threshold(threshold, draft, acceptance, seeds):
    samples = first_tokens("linear_spec", 3, seeds, threshold=threshold, draft=draft, acceptance=acceptance)
    assert chi_square_p(samples, ar_law(PROMPT, 3)) > 1e-3


def test_linear_spec_keeps_the_law_with_a_filter_and_a_threshold():
    samples = first_tokens("linear_spec", 3, threshold=0.3, top_p=0.8)
    assert chi_square_p(samples, ar_law(PROMPT, 3, top_p=0.8)) > 1e-3


def test_the_law_test_detects_a_wrong_law():
    """The test above can fail: ar at temperature 1 is far from the top-p 0.6 law."""
    assert chi_square_p(first_tokens("ar", 2, seeds=1000), ar_law(PROMPT, 2, top_p=0.6)) < 1e-6


class RecordingExecutor(LawExecutor):
    """Remembers every block pass of every slot: (chunk tokens, logits)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.passes: dict[int, list[tuple[list[int], torch.Tensor]]] = {}

    def _forward(self, tokens, tables, chunk_lens, block, lora, committed, all_logits):
        logits = super()._forward(tokens, tables, chunk_lens, block, lora, committed, all_logits)
        for r in range(tokens.shape[0]):
            if block[r]:
                n = int(chunk_lens[r])
                self.passes.setdefault(int(tables[r, 0]), []).append((tokens[r, :n].tolist(), logits[r, :n].clone()))
        return logits


def test_dlm_samples_only_inside_the_filtered_support():
    executor = RecordingExecutor(max_batch=300)
    params = GenerationParams(mode="dlm", max_new_tokens=4, temperature=1.0, top_k=2, block_length=4,
                              threshold=0.5, eos_token_ids=()).resolved(CONFIG)
    seqs = [SEQUENCE_TYPES["dlm"](list(PROMPT), params, CONFIG, seed) for seed in range(300)]
    # 300 sequences admitted at once, no prefix sharing: each has its own first page, so the passes recorded
    # under a first page are one sequence's
    first_page: dict[int, int] = {}
    run(executor, seqs, on_step=lambda s: first_page.setdefault(id(s), s.kv.pages[0]),
        pages=PageManager(executor.layout.pages, executor.layout.page_size, prefix_cache=False))
    checked = 0
    for s in seqs:
        passes = executor.passes[first_page[id(s)]]
        for j in range(1, 4):  # block positions 1..3 = output 1..3, filled by the last pass that saw MASK there
            chunk, logits = [p for p in passes if p[0][j] == MASK][-1]
            top2 = set(logits[j].topk(2).indices.tolist())
            assert s.out[j] in top2, (s.out, j, chunk)
            checked += 1
    assert checked == 900 and len({tuple(s.out) for s in seqs}) > 8  # it did sample


def test_greedy_ignores_the_filters(tiny):
    for mode in ("ar", "dlm", "linear_spec"):
        kw = dict(mode=mode, max_new_tokens=24, block_length=8, eos_token_ids=())
        plain = tiny.generate([1, 40, 41, 42], **kw)
        filters = tiny.generate([1, 40, 41, 42], top_k=3, top_p=0.5, min_p=0.2, **kw)
        assert filters.token_ids == plain.token_ids


def test_draft_logits_depend_on_the_filled_positions():
    """The law executor's drafts really condition on what earlier passes filled (else the threshold tests
    could not tell the rules apart)."""
    a = draft_logits((1, 3, 4, 0), (0, MASK, MASK, MASK), 2)
    b = draft_logits((1, 3, 4, 0), (0, MASK, MASK, 3), 2)
    assert not torch.allclose(a, b)


def test_filtered_oracle_is_plain():
    assert filtered([0.5, 0.3, 0.2], top_k=1) == [1.0, 0.0, 0.0]
    assert filtered([0.5, 0.3, 0.2], top_p=0.7) == pytest.approx([0.625, 0.375, 0.0])
    assert filtered([0.5, 0.3, 0.2], min_p=0.5) == pytest.approx([0.625, 0.375, 0.0])
