"""Greedy linear_spec returns exactly greedy ar's tokens: the strongest check of the whole stack."""

from __future__ import annotations

import random

import pytest

from nld_trt.decoding import GenerationParams, run
from nld_trt.decoding.ar import ARSequence
from nld_trt.decoding.linear_spec import LinearSpecSequence
from nld_trt.tiny import tiny_config

from toy_executor import ToyExecutor

N_PROMPTS = 20
MAX_NEW = 40


def prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 40))] for _ in range(N_PROMPTS)]


@pytest.fixture(scope="module", params=["tiny", "tiny_b"])
def model_and_ar(request):
    model = request.getfixturevalue(request.param)
    ps = prompts(model.config.vocab_size, seed=len(request.param))
    ar = [r.token_ids for r in model.generate(ps, mode="ar", max_new_tokens=MAX_NEW)]
    assert len({tuple(x) for x in ar}) == N_PROMPTS  # distinct outputs: the comparison has teeth
    return model, ps, ar


@pytest.mark.parametrize("block_length", [4, 8, 32])
@pytest.mark.parametrize("lora", [False, True])
def test_greedy_linear_spec_equals_ar_batch_1_and_4(model_and_ar, block_length, lora):
    model, ps, ar = model_and_ar
    assert model.lora is not None
    kw = dict(mode="linear_spec", max_new_tokens=MAX_NEW, block_length=block_length, lora=lora)
    single = [model.generate(p, **kw) for p in ps]
    assert [r.token_ids for r in single] == ar
    batched = []
    for i in range(0, N_PROMPTS, 4):  # four prompts of different lengths per batch
        batched += model.generate(ps[i : i + 4], **kw)
    assert [r.token_ids for r in batched] == ar
    for r in single:
        assert r.stats.nfe == 1 + 2 * len(r.stats.accepted_per_step)
        # the first token comes from the prefill; each step counts only what it added to the output
        assert sum(r.stats.accepted_per_step) == r.stats.tokens - 1


def test_linear_spec_equals_ar_with_eos_and_lengths_not_multiple_of_block(tiny):
    ps = prompts(tiny.config.vocab_size, seed=99)[:8]
    base = [r.token_ids for r in tiny.generate(ps, mode="ar", max_new_tokens=30, eos_token_ids=())]
    eos = base[0][11]  # a token the model really emits mid-output becomes the EOS
    for max_new in (1, 7, 30):
        ar = tiny.generate(ps, mode="ar", max_new_tokens=max_new, eos_token_ids=(eos,))
        spec = tiny.generate(ps, mode="linear_spec", max_new_tokens=max_new, block_length=8, eos_token_ids=(eos,))
        assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
        assert all(len(r.token_ids) <= max_new for r in spec)
    stopped = tiny.generate(ps[0], mode="linear_spec", max_new_tokens=30, block_length=8, eos_token_ids=(eos,))
    assert stopped.finish_reason == "eos" and stopped.token_ids[-1] == eos
    assert eos not in stopped.token_ids[:-1]


@pytest.mark.parametrize("dream", [False, True])
@pytest.mark.parametrize("block_length", [4, 8, 32])
def test_multi_token_acceptance_is_lossless_on_a_scripted_executor(dream, block_length):
    """Drafts that are right for runs of every length: accepted counts vary, output still equals ar."""
    config = tiny_config(vocab_size=64, mask_token_id=63, dlm_type="dream" if dream else "llada")
    ps = [[1, 5 + i, 9 + 2 * i] for i in range(6)]
    params = GenerationParams(max_new_tokens=90, block_length=block_length).resolved(config)
    from dataclasses import replace

    ar = run(ToyExecutor(config, dream=dream), [ARSequence(p, replace(params, mode="ar"), config, 0) for p in ps])
    for lora in (False, True):
        spec_params = replace(params, mode="linear_spec", lora=lora)
        spec = run(ToyExecutor(config, dream=dream), [LinearSpecSequence(p, spec_params, config, 0) for p in ps])
        assert [s.out for s in spec] == [s.out for s in ar]
        counts = [c for s in spec for c in s.stats.accepted_per_step]
        assert max(counts) >= min(block_length, 4) and len(set(counts)) >= min(block_length, 3)
        if lora:
            assert sum(counts) / len(counts) > mean_without
        else:
            mean_without = sum(counts) / len(counts)
