"""Stop strings and stop tokens in every mode (inside a step, across steps, across a block boundary), and
per-token log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

import nld_trt
from law_executor import CONFIG, PROMPT_LAW, LawExecutor, causal_logits, filtered
from paged import Pager
from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.errors import GenerationError
from nld_trt.executors.base import Chunk
from nld_trt.evaluate import load_task


@pytest.fixture(scope="module")
def embedded():
    return nld_trt.load(max_batch=4, max_seq_len=512)


@pytest.fixture(scope="module")
def question():
    return load_task("gsm_synth")[3].question


def trace(nld, question, stop=(), **kw):
    """Decode one request step by step: the sequence and (tokens so far, NFE so far) after each step."""
    params = GenerationParams(max_new_tokens=64, stop=tuple(stop), **kw).resolved(nld.config)
    params.validate(nld.config, nld.executor.max_chunk)
    seq = SEQUENCE_TYPES[params.mode](nld.encode(question), params, nld.config, 0, nld.tokenizer.decode)
    steps, released = [], []

    def on_step(s):
        steps.append((len(s.out), s.stats.nfe))
        if not s.done:  # what streaming may send after this step (a finished one sends its final text)
            released.append(s.output.releasable(s.out)[1])

    run(nld.executor, [seq], on_step=on_step)
    return seq, steps, released


def step_starts(steps) -> list[int]:
    """Output indices at which a step's tokens begin."""
    starts, before = [], 0
    for n, _ in steps:
        if n > before:
            starts.append(before)
        before = n
    return starts


def first_at(text: str, stop: str, position: int) -> bool:
    return text.find(stop) == position


CASES = [("ar", 4), ("dlm", 4), ("dlm", 8), ("dlm", 32), ("linear_spec", 4), ("linear_spec", 8),
         ("linear_spec", 32)]


@pytest.mark.parametrize("mode, block", CASES)
def test_a_stop_string_inside_a_step_across_steps_and_across_a_block(embedded, question, mode, block):
    free, steps, _ = trace(embedded, question, mode=mode, block_length=block)
    ids, decode = free.out, embedded.tokenizer.decode
    text = decode(ids)
    starts = step_starts(steps)
    candidates = {
        # the second and third tokens of a step that committed several, or one token's inner characters
        "inside a step": [(a + 1, a + 3) for a, b in zip(starts, starts[1:] + [len(ids)]) if b - a >= 4]
        or [(k, k + 1) for k in range(1, len(ids)) if len(decode(ids[k : k + 1])) >= 3],
        "across steps": [(k - 1, k + 1) for k in starts[1:]],
    }
    if mode == "dlm":  # a dlm block's last token and the next block's first (linear_spec: a step is a block)
        candidates["across a block"] = [(k - 1, k + 1) for k in starts[1:] if k % block == 0]
    checked = 0
    for case, spans in candidates.items():
        for a, b in spans:
            stop = decode(ids[a:b])
            position = len(decode(ids[:a]))
            if case == "inside a step" and b - a == 1:  # ar: a string inside one token's text
                stop, position = stop[1:-1], position + 1
            if len(stop.strip()) < 2 or not first_at(text, stop, position) or b > len(ids) - 1:
                continue
            seq, stopped_steps, released = trace(embedded, question, stop=[stop, "never-seen-xyz"], mode=mode,
                                                 block_length=block)
            assert seq.text() == text[:position], case
            assert (seq.finish_reason, seq.stop_reason) == ("stop", stop)
            assert seq.out == ids[:b]  # up to the token that completed the stop string
            # it left the batch in the step that completed the stop string, freeing its slot
            expected_nfe = next(nfe for n, nfe in steps if n >= b)
            assert seq.stats.nfe == expected_nfe
            assert embedded.pages.in_use == 0
            # streaming released only text the final answer keeps
            assert all(seq.text().startswith(r) for r in released)
            checked += 1
            break
    assert checked == len(candidates), candidates


def test_stop_token_ids_end_generation_and_leave_their_text_out(embedded, question):
    free = embedded.generate(question, mode="linear_spec", max_new_tokens=48)
    k = 10
    token = free.token_ids[k]
    first = free.token_ids.index(token)
    r = embedded.generate(question, mode="linear_spec", max_new_tokens=48, stop_token_ids=[token])
    assert (r.finish_reason, r.stop_reason) == ("stop", token)
    assert r.token_ids == free.token_ids[: first + 1]
    assert r.text == embedded.tokenizer.decode(free.token_ids[:first])


def test_min_tokens_holds_eos_back_in_every_mode(embedded, question):
    free = embedded.generate(question, mode="ar", max_new_tokens=128)
    assert free.finish_reason == "eos"
    n = len(free.token_ids) + 5
    ar = embedded.generate(question, mode="ar", max_new_tokens=n + 3, min_tokens=n)
    assert len(ar.token_ids) >= n and ar.token_ids[: len(free.token_ids) - 1] == free.token_ids[:-1]
    assert all(t not in embedded.config.eos_token_ids for t in ar.token_ids[:n])
    spec = embedded.generate(question, mode="linear_spec", max_new_tokens=n + 3, min_tokens=n)
    assert spec.token_ids == ar.token_ids  # still lossless
    dlm = embedded.generate(question, mode="dlm", max_new_tokens=n + 3, min_tokens=n, block_length=8)
    assert all(t not in embedded.config.eos_token_ids for t in dlm.token_ids[:n])


def test_bad_stop_fields_are_named(tiny):
    for params, message in [
        (dict(stop=[""]), "stop must be a list of non-empty strings"),
        (dict(stop=[3]), "stop must be a list of non-empty strings"),
        (dict(stop=["x"] * 40), "at most 32 stop strings"),
        (dict(stop_token_ids=[10**6]), r"stop_token_ids must be a token id in \[0, 512\), got 1000000"),
        (dict(top_k=-1), r"top_k must be an integer in \[0, 512\], got -1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \[0, 1\], got 1.5"),
        (dict(min_p=2), r"min_p must be a number in \[0, 1\], got 2"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 18446744073709551615\]"),
        (dict(seed=1e30), r"seed must be an integer"),
        (dict(top_logprobs=3), "top_logprobs needs logprobs=true"),
        (dict(logprobs=True, top_logprobs=21), r"top_logprobs must be an integer in \[0, 20\], got 21"),
        (dict(min_tokens=300, max_new_tokens=10), r"min_tokens must be an integer in \[0, 10\], got 300"),
        (dict(draft="twice"), "draft must be one of repeat, once, got 'twice'"),
    ]:
        with pytest.raises(GenerationError, match=message):
            tiny.generate([1, 40, 41], **params)


# ---------------------------------------------------------------------------------------------------
def test_greedy_logprobs_are_the_plain_softmax_and_linear_spec_matches_ar(tiny):
    prompt = [1, 40, 41, 42, 43]
    ar = tiny.generate(prompt, mode="ar", max_new_tokens=16, eos_token_ids=(), logprobs=True, top_logprobs=3)
    # the reference: one causal pass over prompt + output on fresh pages
    ex = Pager(tiny.executor)
    slot = ex.allocate()
    try:
        logits = ex.forward([slot], [Chunk(prompt + ar.token_ids)])[0]
    finally:
        ex.release(slot)
    logp = torch.log_softmax(logits.double(), -1)[len(prompt) - 1 : -1]
    for i, lp in enumerate(ar.logprobs):
        assert lp.token_id == ar.token_ids[i]
        assert lp.logprob == pytest.approx(float(logp[i, lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == logp[i].topk(3).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy: the most likely token
    spec = tiny.generate(prompt, mode="linear_spec", block_length=8, max_new_tokens=16, eos_token_ids=(),
                         logprobs=True, top_logprobs=3)
    assert spec.token_ids == ar.token_ids
    for a, b in zip(ar.logprobs, spec.logprobs):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
    dlm = tiny.generate(prompt, mode="dlm", block_length=8, max_new_tokens=16, eos_token_ids=(), logprobs=True,
                        top_logprobs=2)
    assert len(dlm.logprobs) == len(dlm.token_ids)
    assert all(lp.top[0][0] == lp.token_id and lp.logprob <= 0 for lp in dlm.logprobs)


def test_sampled_logprobs_are_those_of_the_filtered_law():
    params = GenerationParams(mode="ar", max_new_tokens=3, temperature=0.8, top_k=3, eos_token_ids=(), logprobs=True,
                              top_logprobs=5).resolved(CONFIG)
    seqs = [SEQUENCE_TYPES["ar"](list(PROMPT_LAW), params, CONFIG, seed) for seed in range(20)]
    run(LawExecutor(max_batch=32), seqs)
    for s in seqs:
        for i, lp in enumerate(s.logprobs):
            probs = torch.softmax(causal_logits(PROMPT_LAW + tuple(s.out[:i])) / 0.8, -1).tolist()
            law = filtered(probs, top_k=3)
            assert lp.logprob == pytest.approx(math.log(law[lp.token_id]), abs=1e-6)  # oracle: float32 softmax
            finite = [(t, v) for t, v in lp.top if v > -math.inf]
            assert len(finite) == 3 and sorted(v for _, v in finite) == pytest.approx(sorted(math.log(p) for p in law if p), abs=1e-6)


def test_a_forced_thinking_token_has_logprob_zero(tiny):
    r = tiny.generate([1, 40, 41], mode="ar", max_new_tokens=8, eos_token_ids=(), max_thinking_tokens=3,
                      end_think_token_id=35, logprobs=True)
    assert r.token_ids[3] == 35 and r.logprobs[3].logprob == 0.0
