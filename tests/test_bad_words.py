"""bad_words: a token that would complete a banned word has probability zero wherever a token is drawn.

Banned words never appear (greedy and sampled, in every mode, single- and multi-token, across the prompt's
end); greedy linear_spec still equals greedy ar; the sampled laws of ar and linear_spec are the exact banned
law (chi-square on the scripted 6-token model of tests/law_executor.py); bad input gets a clear error."""

from __future__ import annotations

import itertools

import pytest
import torch

from law_executor import CONFIG, V, LawExecutor, causal_logits, filtered
from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.decoding.bad_words import BadWords
from nld_trt.errors import GenerationError
from test_sampling_laws import chi_square_p

PROMPT = [1, 40, 41, 42]
MODES = ["ar", "dlm", "linear_spec", "auto"]


def occurrences(prompt: list[int], out: list[int], words) -> list[tuple[int, ...]]:
    """Banned words that end inside the output (a word may start in the prompt)."""
    seq = list(prompt) + list(out)
    found = []
    for w in words:
        k = len(w)
        for end in range(len(prompt), len(seq)):
            if end + 1 >= k and tuple(seq[end + 1 - k : end + 1]) == tuple(w):
                found.append(tuple(w))
    return found


def words_from(tiny, mode: str, **kw) -> list[tuple[int, ...]]:
    """Words the unbanned output contains: a single token, a two-token word, and one across the prompt's end."""
    out = tiny.generate(PROMPT, mode=mode, max_new_tokens=24, block_length=8, eos_token_ids=(), **kw).token_ids
    return [(out[3],), (out[6], out[7]), (PROMPT[-1], out[0])]


@pytest.mark.parametrize("mode", MODES)
def test_banned_words_never_appear_greedy(tiny, mode):
    words = words_from(tiny, mode)
    r = tiny.generate(PROMPT, mode=mode, max_new_tokens=24, block_length=8, eos_token_ids=(), bad_words=words)
    assert len(r.token_ids) == 24 and not occurrences(PROMPT, r.token_ids, words)


@pytest.mark.parametrize("mode", MODES)
def test_banned_words_never_appear_sampled(tiny, mode):
    words = words_from(tiny, mode, temperature=1.0, seed=3)
    extra = {"threshold": 0.3} if mode == "linear_spec" else {}
    results = tiny.generate([PROMPT] * 4, mode=mode, max_new_tokens=24, block_length=8, eos_token_ids=(),
                            temperature=1.0, seed=3, bad_words=words, **extra)
    assert all(not occurrences(PROMPT, r.token_ids, words) for r in results)
    assert len({tuple(r.token_ids) for r in results}) > 1  # it did sample


def test_greedy_linear_spec_still_equals_greedy_ar(tiny, tiny_b):
    for model in (tiny, tiny_b):
        words = words_from(model, "ar")
        kw = dict(max_new_tokens=40, eos_token_ids=(), bad_words=words)
        ar = model.generate(PROMPT, mode="ar", **kw)
        for block, threshold in ((8, 0.0), (4, 0.5), (32, 0.0)):
            spec = model.generate(PROMPT, mode="linear_spec", block_length=block, threshold=threshold, **kw)
            assert spec.token_ids == ar.token_ids


def test_dlm_never_completes_a_word_with_two_fills_of_one_pass():
    """Two positions filled in the same denoising pass must not complete a word together."""
    bad = BadWords([(3, 4), (2,)])
    known = [1, None, None, None]  # context 1, then three masked positions
    keep = bad.drop_conflicts(known, [1, 2, 3], [3, 4, 4], order=[0, 1, 2])
    assert keep == [True, False, True]  # 4 after 3 would complete (3, 4); 4 after a MASK is fine
    assert bad.banned([1, 3, None], 2, causal=True) == {4}
    assert bad.banned([None, None, 4], 1, causal=False) == {3} and bad.banned([None, None, 4], 1, causal=True) == set()


def test_the_trtllm_ids_form_and_strings_give_the_same_words(tiny):
    words = tiny.tokenizer.word_ids(["apples", [5, 6]])
    assert words == (tuple(tiny.tokenizer.encode("apples", add_special_tokens=False)), (5, 6))
    assert tiny.tokenizer.word_ids([""]) == ()  # a word that encodes to nothing is skipped, as TensorRT-LLM does


@pytest.mark.parametrize("kw, message", [
    (dict(bad_words=[[10**6]]), r"bad_words must be a token id in \[0, "),
    (dict(bad_words="apples"), "bad_words must be a list of strings or token-id lists"),
    (dict(bad_words=[[1]] * 300), "at most 256 bad_words per request"),
])
def test_bad_bad_words_are_refused_clearly(tiny, kw, message):
    with pytest.raises(GenerationError, match=message):
        tiny.generate(PROMPT, max_new_tokens=2, **kw)


def test_a_request_whose_bad_words_ban_everything_fails_alone():
    params = GenerationParams(max_new_tokens=2, eos_token_ids=(), bad_words=tuple((t,) for t in range(V))
                              ).resolved(CONFIG)
    ok = GenerationParams(max_new_tokens=2, eos_token_ids=()).resolved(CONFIG)
    seqs = [SEQUENCE_TYPES["ar"]([1, 3, 4], params, CONFIG, 0), SEQUENCE_TYPES["ar"]([1, 3, 4], ok, CONFIG, 0)]
    run(LawExecutor(max_batch=2), seqs)
    assert seqs[0].finish_reason == "error" and "ban every token at output index 0" in seqs[0].error
    assert seqs[1].finish_reason == "length" and len(seqs[1].out) == 2


# the exact law with a banned token ------------------------------------------------------------------
LAW_PROMPT = (1, 3, 4)
LAW_WORDS = ((2,), (4, 0), (0, 1))  # a single token, a word across the prompt's end, a word inside the output


def banned_law(prompt, length: int, words, **filters) -> dict[tuple[int, ...], float]:
    """The exact law of the first `length` tokens of sampled ar at temperature 1 with these banned words:
    the softmax with the banned tokens at zero, renormalised, then the filters."""
    law = {}
    for tokens in itertools.product(range(V - 1), repeat=length):
        p = 1.0
        for i, tok in enumerate(tokens):
            context = prompt + tokens[:i]
            probs = torch.softmax(causal_logits(context), -1).tolist()
            for w in words:
                if tuple(context[len(context) - len(w) + 1:]) == w[:-1] or len(w) == 1:
                    probs[w[-1]] = 0.0
            total = sum(probs)
            p *= filtered([q / total for q in probs], **filters)[tok]
            if p == 0.0:
                break
        if p > 0:
            law[tokens] = p
    return law


def sampled(mode: str, length: int, seeds: int = 4000, **kw) -> list[tuple[int, ...]]:
    params = GenerationParams(mode=mode, max_new_tokens=length, temperature=1.0, block_length=4, eos_token_ids=(),
                              bad_words=LAW_WORDS, **kw).resolved(CONFIG)
    params.validate(CONFIG, 8)
    seqs = [SEQUENCE_TYPES[mode](list(LAW_PROMPT), params, CONFIG, seed) for seed in range(seeds)]
    run(LawExecutor(max_batch=512), seqs)
    return [tuple(s.out) for s in seqs]


@pytest.mark.parametrize("mode, kw", [
    ("ar", {}), ("linear_spec", {}), ("linear_spec", {"threshold": 0.3}), ("linear_spec", {"top_p": 0.8}),
    ("linear_spec", {"acceptance": "official"}), ("auto", {}),
], ids=["ar", "linear_spec", "linear_spec-threshold", "linear_spec-top_p", "linear_spec-official", "auto"])
def test_sampled_tokens_follow_the_exact_banned_law(mode, kw):
    filters = {k: v for k, v in kw.items() if k == "top_p"}
    law = banned_law(LAW_PROMPT, 3, LAW_WORDS, **filters)
    assert not any(t[0] == 0 or 2 in t or (0, 1) in zip(t, t[1:]) for t in law)  # the oracle bans them
    assert chi_square_p(sampled(mode, 3, **kw), law) > 1e-3


def test_the_banned_law_test_can_fail():
    """Sampling without the ban is far from the banned law (the test above is not vacuous)."""
    params = GenerationParams(max_new_tokens=2, temperature=1.0, eos_token_ids=()).resolved(CONFIG)
    seqs = [SEQUENCE_TYPES["ar"](list(LAW_PROMPT), params, CONFIG, seed) for seed in range(1000)]
    run(LawExecutor(max_batch=512), seqs)
    assert chi_square_p([tuple(s.out) for s in seqs], banned_law(LAW_PROMPT, 2, LAW_WORDS)) < 1e-6


def test_the_cli_bans_words_as_the_python_api(tiny, tiny_dir, capsys):
    import json

    from nld_trt.cli import main

    free = tiny.generate("Tom has 12 apples.", chat=False, max_new_tokens=12)
    word = next(tiny.tokenizer.decode([t]) for t in free.token_ids  # a token whose text encodes back to it
                if tiny.tokenizer.encode(tiny.tokenizer.decode([t]), add_special_tokens=False) == [t])
    main(["generate", "--model", str(tiny_dir), "--raw", "--json", "--max-new-tokens", "12", "--bad-word", word,
          "Tom has 12 apples."])
    got = json.loads(capsys.readouterr().out)
    want = tiny.generate("Tom has 12 apples.", chat=False, max_new_tokens=12, bad_words=[word])
    assert got["token_ids"] == want.token_ids and got["token_ids"] != free.token_ids
