"""Thinking budget, sampling, and the acceptance rules."""

from __future__ import annotations

import pytest
import torch

from nld_trt.decoding.select import Sampling, accept_greedy, accept_speculative, candidates, dlm_fill

PROMPT = [1, 40, 41, 42, 43]


def test_thinking_budget_forces_end_think_at_the_budget_in_every_mode(tiny):
    free = tiny.generate(PROMPT, mode="ar", max_new_tokens=24, eos_token_ids=())
    end = next(t for t in range(3, 500) if t not in free.token_ids)  # a token the model does not emit here
    budget = dict(max_thinking_tokens=6, end_think_token_id=end, max_new_tokens=24, eos_token_ids=())
    ar = tiny.generate(PROMPT, mode="ar", **budget)
    assert ar.token_ids[:6] == free.token_ids[:6] and ar.token_ids[6] == end
    for b in (4, 8, 32):
        spec = tiny.generate(PROMPT, mode="linear_spec", block_length=b, **budget)
        assert spec.token_ids == ar.token_ids
    for b in (4, 8):
        dlm = tiny.generate(PROMPT, mode="dlm", block_length=b, **budget)
        assert dlm.token_ids[6] == end and len(dlm.token_ids) == 24


def test_thinking_budget_is_not_forced_when_thinking_already_ended(tiny):
    free = tiny.generate(PROMPT, mode="ar", max_new_tokens=24, eos_token_ids=())
    end = free.token_ids[3]  # the model closes "thinking" by itself before the budget
    budget = dict(max_thinking_tokens=6, end_think_token_id=end, max_new_tokens=24, eos_token_ids=())
    assert tiny.generate(PROMPT, mode="ar", **budget).token_ids == free.token_ids
    assert tiny.generate(PROMPT, mode="linear_spec", block_length=8, **budget).token_ids == free.token_ids


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_sampling_is_seeded_and_batch_independent(tiny, mode):
    kw = dict(mode=mode, temperature=1.0, max_new_tokens=24, block_length=8, eos_token_ids=())
    a = tiny.generate([PROMPT, PROMPT[:3]], seed=3, **kw)
    again = tiny.generate([PROMPT, PROMPT[:3]], seed=3, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in again]
    # sequence i of a batch samples with seed + i, exactly as on its own
    assert tiny.generate(PROMPT[:3], seed=4, **kw).token_ids == a[1].token_ids
    other = tiny.generate(PROMPT, seed=11, **kw)
    greedy = tiny.generate(PROMPT, **{**kw, "temperature": 0.0})
    assert other.token_ids != a[0].token_ids and a[0].token_ids != greedy.token_ids


def test_official_acceptance_rule_runs_and_stays_within_the_budget(tiny):
    r = tiny.generate(PROMPT, mode="linear_spec", temperature=0.7, acceptance="official", block_length=8,
                      max_new_tokens=20, eos_token_ids=())
    assert len(r.token_ids) == 20 and all(1 <= n <= 8 for n in r.stats.accepted_per_step)


def test_speculative_sampling_preserves_the_verifier_distribution():
    """First emitted token over many draws: its law is p_verify, whatever the drafter proposes."""
    g = torch.Generator().manual_seed(0)
    p_verify = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([0.1, 0.6, 0.1, 0.2], dtype=torch.float64)
    p_draft = torch.stack([torch.zeros(4, dtype=torch.float64), q])
    counts = torch.zeros(4)
    draws = 20000
    for _ in range(draws):
        x = int(torch.multinomial(q, 1, generator=g))
        out = accept_speculative(torch.tensor([0, x]), torch.tensor([True, True]), p_draft, p_verify, g)
        counts[out[0]] += 1
    tv = 0.5 * (counts / draws - p_verify[0].float()).abs().sum().item()
    assert tv < 0.015
    # token 1, which the drafter proposes 60% of the time, keeps the verifier's 0.2
    assert abs(counts[1] / draws - 0.2) < 0.015


def test_greedy_acceptance_counts_leading_matches():
    draft = torch.tensor([9, 4, 5, 6, 7])
    assert accept_greedy(draft, torch.tensor([4, 5, 0, 7, 1])) == 2
    assert accept_greedy(draft, torch.tensor([4, 5, 6, 7, 3])) == 4
    assert accept_greedy(draft, torch.tensor([1, 5, 6, 7, 3])) == 0


def test_dlm_fill_takes_the_most_confident_and_those_above_threshold():
    masked = torch.tensor([True, False, True, True])
    conf = torch.tensor([0.2, 0.99, 0.5, 0.95])
    assert dlm_fill(masked, conf, 0.9).tolist() == [False, False, False, True]
    assert dlm_fill(masked, conf, 0.99).tolist() == [False, False, False, True]  # top-1 always
    assert dlm_fill(masked, conf, 0.4).tolist() == [False, False, True, True]
    assert dlm_fill(masked, conf, 1.0, fill_all=True).tolist() == [True, False, True, True]


def test_gumbel_candidates_sample_softmax_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    tokens, conf = candidates(logits, Sampling(temperature=0.5), generator=g)
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    expected = torch.softmax(logits[0] / 0.5, -1)
    assert (freq - expected).abs().max() < 0.01
    assert torch.allclose(conf[tokens == 0], torch.softmax(logits[0], -1)[0].expand(int((tokens == 0).sum())))


def test_dlm_does_not_force_end_think_when_an_earlier_position_of_the_block_ended_thinking(tiny):
    """Budget m = 3 inside the first block; the model fills position 2 with end-think during denoising:
    index 3 is no longer forced (thinking ended once) and is denoised like any other position."""
    from nld_trt.decoding.dlm import DLMSequence
    from nld_trt.decoding.params import GenerationParams

    v, end, a, b, c, y = tiny.config.vocab_size, 35, 50, 51, 52, 53

    def rows(*tokens):  # block-pass logits whose position j strongly prefers tokens[j-1] (llada: own position)
        logits = torch.zeros(4, v)
        for j, (tok, height) in enumerate(tokens, start=1):
            if tok is not None:
                logits[j, tok] = height
        return logits

    params = GenerationParams(mode="dlm", block_length=4, threshold=0.9, max_new_tokens=8, eos_token_ids=(),
                              max_thinking_tokens=3, end_think_token_id=end).resolved(tiny.config)
    seq = DLMSequence([1, 2, 3], params, tiny.config, seed=0)
    first = torch.zeros(v)
    first[a] = 20.0
    seq.start(first)
    assert seq.next_chunk().tokens == [a, tiny.config.mask_token_id, tiny.config.mask_token_id, end]  # forced
    # pass 1: only position 2 is confident, and it is end-think
    seq.consume(rows((b, 1.0), (end, 30.0), (None, 0)))
    assert seq.next_chunk().tokens[3] == tiny.config.mask_token_id  # the forced end-think was taken back
    seq.consume(rows((b, 30.0), (None, 0), (y, 30.0)))
    assert seq.out == [a, b, end, y]
    assert seq.out.count(end) == 1
