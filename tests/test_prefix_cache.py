"""Paged batching and prefix reuse, checked against the plain path (prefix cache off, a pool that never runs
out): multi-turn conversations that reuse earlier answers, batches sharing a system prompt, prompts ending
on a page boundary, fully cached prompts, more requests than the pool holds (preemption and resume in the
middle of a dlm block, a linear_spec draft, an auto step), sampled runs keeping their seeds' draws, prompt
log-probability requests, and extra keys. The scripted executors compute logits from the tokens the pages
hold, so any wrong page, wrong share or stale prefix changes the tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from law_executor import CONFIG as LAW_CONFIG
from law_executor import LawExecutor
from nld_trt.decoding import SEQUENCE_TYPES, Batcher, GenerationParams, run
from nld_trt.decoding.auto import AR, AutoPlanner
from nld_trt.kv import ExtraKey, PageManager, PagesStored
from nld_trt.tiny import tiny_config
from toy_executor import ToyExecutor

CONFIG = tiny_config(vocab_size=64, mask_token_id=63)
MODES = ("ar", "dlm", "linear_spec", "auto")
FORCED = [AR, ("linear_spec", 4), ("linear_spec", 8), AR, ("linear_spec", 2)]


def planner() -> AutoPlanner:
    """auto with a scripted choice (the chooser itself is tested elsewhere): switches mid-request, as a
    function of the request's own progress (a real planner's choice depends on the load, so a sampled auto
    request keeps its law, not its draws, when other requests change)."""
    return AutoPlanner(cost=None, force=lambda seq, n: FORCED[len(seq.out) % len(FORCED)])


def params(mode: str, config=CONFIG, **kw) -> GenerationParams:
    kw = {"max_new_tokens": 24, "block_length": 8, "eos_token_ids": (), **kw}
    return GenerationParams(mode=mode, **kw).resolved(config)


def decode(executor, prompts, mode, pages=None, config=CONFIG, **kw):
    """Every prompt decoded (batched) on `executor`; returns the sequences."""
    p = params(mode, config, **kw)
    seqs = [SEQUENCE_TYPES[mode](list(x), p, config, seed) for seed, x in enumerate(prompts)]
    run(executor, seqs, planner=planner() if mode == "auto" else None, pages=pages)
    assert all(s.error is None for s in seqs), [s.error for s in seqs]
    return seqs


def plain(executor):
    """The plain path: no prefix reuse."""
    return PageManager(executor.layout.pages, executor.layout.page_size, prefix_cache=False)


def rand_prompts(n: int, seed: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 60) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("mode", MODES)
def test_multi_turn_conversations_reuse_earlier_answers_and_give_the_plain_tokens(mode):
    cached, cold = ToyExecutor(CONFIG, max_batch=4), ToyExecutor(CONFIG, max_batch=4)
    pages = PageManager(cached.layout.pages, cached.layout.page_size)
    history = rand_prompts(6, seed=1)
    rng = random.Random(2)
    for turn in range(3):
        hot = decode(cached, history, mode, pages)
        ref = decode(cold, history, mode, plain(cold))
        assert [s.out for s in hot] == [s.out for s in ref]
        if turn:
            # the previous turn's prompt and (all but its last) answer tokens came from the cache, whole pages
            for s, before in zip(hot, previous):
                assert s.stats.cached_tokens >= (before - 4) // 4 * 4 - 4, (turn, s.stats.cached_tokens, before)
                assert s.stats.cached_tokens + s.stats.prefill_tokens == len(s.prompt)
            assert sum(s.stats.prefill_tokens for s in hot) < sum(s.stats.prefill_tokens for s in ref) / 2
        previous = [len(s.prompt) + len(s.out) for s in hot]
        history = [s.prompt + s.out + [rng.randrange(3, 60) for _ in range(5)] for s in hot]
    pages.check()
    assert pages.in_use == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_shared_system_prompt_is_computed_once_per_batch(mode):
    system = [1] + list(range(10, 40))  # 31 tokens: 7 full pages of 4
    prompts = [system + [50 + i, 51, 52 + i] for i in range(6)]
    ex = ToyExecutor(CONFIG, max_batch=6)
    pages = PageManager(ex.layout.pages, ex.layout.page_size)
    hot = decode(ex, prompts, mode, pages)
    ref = decode(ToyExecutor(CONFIG, max_batch=6), prompts, mode, PageManager(ex.layout.pages, 4, prefix_cache=False))
    assert [s.out for s in hot] == [s.out for s in ref]
    # the first computes the system prompt; the others wait one round and reuse its 7 pages
    assert [s.stats.cached_tokens for s in hot] == [0] + [28] * 5
    assert sum(s.stats.prefill_tokens for s in hot) == 34 + 5 * 6
    assert pages.stats.queries == 6 * 34 and pages.stats.hits == 5 * 28


def test_page_boundaries_and_fully_cached_prompts():
    ex = ToyExecutor(CONFIG, max_batch=2)
    pages = PageManager(ex.layout.pages, ex.layout.page_size)
    cold = ToyExecutor(CONFIG, max_batch=2)
    for length in (8, 9, 11, 12, 13):  # on a page boundary (8, 12) and around it
        prompt = [1] + list(range(20, 20 + length - 1))
        first = decode(ex, [prompt], "ar", pages)[0]
        again = decode(ex, [prompt], "ar", pages)[0]  # the whole prompt is cached now
        ref = decode(cold, [prompt], "ar", plain(cold))[0]
        assert first.out == again.out == ref.out
        # at least the last prompt token is computed (its logits give the first token), whole pages before it
        assert again.stats.cached_tokens == (length - 1) // 4 * 4
        assert again.stats.prefill_tokens == length - again.stats.cached_tokens >= 1


@pytest.mark.parametrize("mode", MODES)
def test_more_requests_than_the_pool_holds_all_finish_with_unchanged_tokens(mode):
    # 10 requests of up to 30 + 24 tokens (+ a block): the pool holds one such request, not two
    prompts = rand_prompts(10, seed=3, lo=10, hi=30)
    small = ToyExecutor(CONFIG, max_batch=6, max_seq_len=64, kv_cache_tokens=72)
    pages = PageManager(small.layout.pages, small.layout.page_size)
    hot = decode(small, prompts, mode, pages)
    ref = decode(ToyExecutor(CONFIG, max_batch=10), prompts, mode, plain(small))
    assert [s.out for s in hot] == [s.out for s in ref]
    assert pages.stats.preemptions > 0 and sum(s.stats.preemptions for s in hot) == pages.stats.preemptions
    assert pages.in_use == 0
    pages.check()


def mid_step(s) -> bool:
    """Between two passes of one step: a dlm block partly denoised, a draft not yet verified, an auto option
    in progress."""
    if s.mode == "auto":
        return s.option is not None
    return getattr(s, "passes", 0) > 0


@pytest.mark.parametrize("mode", ["dlm", "linear_spec", "auto"])
def test_preemption_in_the_middle_of_a_step_resumes_it(mode):
    """Sequences preempted between the passes of one step (dlm with a high threshold: several denoising
    passes per block; linear_spec drafting with repeat: several draft passes per step; auto between its draft
    and its verify), with and without cached pages to resume from, still give the plain tokens; the cache
    held exactly the committed tokens when they gave it back. (Preemption by a full pool: the test above.)"""
    prompts = rand_prompts(6, seed=4, lo=12, hi=30)
    kw = dict(threshold=0.95) if mode != "auto" else {}
    ref = [s.out for s in decode(ToyExecutor(CONFIG, max_batch=6), prompts, mode, **kw)]
    for prefix_cache in (True, False):
        ex = ToyExecutor(CONFIG, max_batch=6)
        pages = PageManager(ex.layout.pages, ex.layout.page_size, prefix_cache=prefix_cache)
        p = params(mode, **kw)
        seqs = [SEQUENCE_TYPES[mode](list(x), p, CONFIG, seed) for seed, x in enumerate(prompts)]
        batcher = Batcher(ex, planner=planner() if mode == "auto" else None, pages=pages)
        for s in seqs:
            batcher.submit(s)
        preempted, step = 0, 0
        while not batcher.idle:
            batcher.step()
            step += 1
            for s in list(batcher.active):  # each at most twice, at different points of its run
                if mid_step(s) and not s.done and s.stats.preemptions < 2 and (step + s.arrival) % 4 == 0:
                    assert s.kv.tokens == (s.prompt + s.out)[: len(s.kv.tokens)]  # the committed tokens only
                    batcher.preempt(s)
                    preempted += 1
        assert [s.out for s in seqs] == ref
        assert preempted > 3 and pages.stats.preemptions == preempted and pages.in_use == 0
        pages.check()


@pytest.mark.parametrize("mode", MODES)
def test_sampled_runs_keep_their_seeds_draws_through_preemption_and_reuse(mode):
    prompts = [[1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1][: 5 + i] for i in range(6)] * 2
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=8, block_length=4)
    ref = decode(LawExecutor(max_batch=12), prompts, mode, config=LAW_CONFIG, **kw)
    small = LawExecutor(max_batch=12, max_seq_len=32)
    small_pool = ToyPool(small, tokens=32)
    hot = decode(small_pool.executor, prompts, mode, small_pool.pages, config=LAW_CONFIG, **kw)
    assert [s.out for s in hot] == [s.out for s in ref]
    assert small_pool.pages.stats.preemptions > 0 and small_pool.pages.stats.hits > 0


@dataclass
class ToyPool:
    """A law executor whose pool holds `tokens` positions."""

    executor: LawExecutor
    tokens: int

    def __post_init__(self) -> None:
        from nld_trt.kv.layout import KVLayout

        ex = self.executor
        ex.layout = KVLayout.build(LAW_CONFIG, ex.max_seq_len, ex.layout.dtype, tokens=self.tokens,
                                   page_size=ex.layout.page_size)
        ex.store = [[0] * ex.layout.page_size for _ in range(ex.layout.pages + 1)]
        self.pages = PageManager(ex.layout.pages, ex.layout.page_size)


@pytest.mark.parametrize("top", [0, 1])
def test_a_request_for_prompt_logprobs_computes_its_whole_prompt(top):
    """Scoring needs every prompt position's logits, so nothing comes from the cache (also with 0 alternatives
    asked: prompt_logprobs=0 still scores the prompt)."""
    ex = ToyExecutor(CONFIG, max_batch=2)
    pages = PageManager(ex.layout.pages, ex.layout.page_size)
    prompt = [1] + list(range(10, 30))
    decode(ex, [prompt], "ar", pages)
    seq = decode(ex, [prompt], "ar", pages, max_new_tokens=8, prompt_logprobs=top)[0]
    assert seq.stats.cached_tokens == 0 and seq.stats.prefill_tokens == len(prompt)
    assert len(seq.prompt_logprobs) == len(prompt) and all(len(lp.top) == top for lp in seq.prompt_logprobs[1:])
    cold = decode(ex, [prompt], "ar", plain(ex), max_new_tokens=8, prompt_logprobs=top)[0]
    assert seq.prompt_logprobs == cold.prompt_logprobs
    again = decode(ex, [prompt], "ar", pages)[0]
    assert again.stats.cached_tokens == 20 and again.out[:8] == seq.out


def test_extra_keys_decide_sharing_and_reach_the_events():
    ex = ToyExecutor(CONFIG, max_batch=4)
    events = []
    pages = PageManager(ex.layout.pages, ex.layout.page_size, on_event=events.append)
    prompt = [1, 9, 9, 9, 9, 9, 9, 9, 9, 5, 6, 7, 8]  # "image pads" at 1..8
    p = params("ar", max_new_tokens=4)

    def seq(digest: bytes | None):
        s = SEQUENCE_TYPES["ar"](list(prompt), p, CONFIG, 0)
        if digest is not None:
            s.extra_keys = (ExtraKey(1, 9, digest),)
        return s

    first = seq(b"image-a")
    run(ex, [first], pages=pages)
    same, other, none = seq(b"image-a"), seq(b"image-b"), seq(None)
    run(ex, [same, other, none], pages=pages)
    assert first.stats.cached_tokens == 0 and same.stats.cached_tokens == 12
    assert other.stats.cached_tokens == 0 and none.stats.cached_tokens == 0
    stored = [page for e in events if isinstance(e, PagesStored) for page in e.pages]
    assert {page.extra_keys for page in stored[:3]} == {(ExtraKey(1, 9, b"image-a"),)}
    assert stored[0].token_ids == (1, 9, 9, 9) and stored[1].parent_hash == stored[0].hash


def test_a_cancelled_or_preempted_sequence_holds_no_pages():
    ex = ToyExecutor(CONFIG, max_batch=4, max_seq_len=64, kv_cache_tokens=64)
    pages = PageManager(ex.layout.pages, ex.layout.page_size)
    batcher = Batcher(ex, pages=pages)
    seqs = [SEQUENCE_TYPES["linear_spec"](x, params("linear_spec", max_new_tokens=30), CONFIG, 0)
            for x in rand_prompts(4, seed=5, lo=20, hi=28)]
    for s in seqs:
        batcher.submit(s)
    for _ in range(6):
        batcher.step()
    batcher.preempt(batcher.active[-1])
    held = sum(len(s.kv.pages) for s in batcher.active)
    assert held == pages.in_use and all(not s.kv.pages for s in batcher.waiting if s.kv is not None)
    assert any(s.kv is not None and s.kv.tokens for s in batcher.waiting)  # waits with its committed tokens
    unfinished = [s for s in seqs if not s.done]
    for s in seqs:
        batcher.cancel(s)
    batcher.step()
    assert batcher.idle and pages.in_use == 0
    assert unfinished and all(s.finish_reason == "cancelled" for s in unfinished)
    pages.check()


def test_a_request_larger_than_the_pool_fails_alone_with_a_clear_error():
    ex = ToyExecutor(CONFIG, max_batch=2, max_seq_len=64, kv_cache_tokens=64)
    seqs = [SEQUENCE_TYPES["ar"]([1] * 70, params("ar"), CONFIG, 0),
            SEQUENCE_TYPES["ar"]([1, 5, 6], params("ar"), CONFIG, 0)]
    run(ex, seqs, pages=PageManager(ex.layout.pages, ex.layout.page_size))
    assert "needs 18 KV-cache pages" in seqs[0].error and seqs[1].error is None and len(seqs[1].out) == 24


def test_a_max_seq_len_prompt_with_one_new_token_fits_the_smallest_pool():
    # check_fits accepts prompt + max_new_tokens - 1 <= max_seq_len, and the smallest pool holds one max_seq_len
    # sequence: an ar request taking its one token from the prefill writes nothing past its prompt
    prompt = [1] + [i % 50 + 5 for i in range(63)]
    p = params("ar", max_new_tokens=1)
    assert p.cache_positions(len(prompt)) == 64
    small = ToyExecutor(CONFIG, max_batch=2, max_seq_len=64, kv_cache_tokens=64)
    hot = SEQUENCE_TYPES["ar"](prompt, p, CONFIG, 0)
    pages = PageManager(small.layout.pages, small.layout.page_size)
    run(small, [hot], pages=pages)
    big = ToyExecutor(CONFIG, max_batch=2, max_seq_len=64)
    ref = SEQUENCE_TYPES["ar"](prompt, p, CONFIG, 0)
    run(big, [ref], pages=plain(big))
    assert hot.error is None and ref.error is None and hot.out == ref.out and len(hot.out) == 1
    assert pages.in_use == 0
    pages.check()


def test_a_sequence_whose_rule_fails_gives_its_pages_back_before_the_others_reserve_theirs():
    """A failure is kept to the sequence it touches: its pages are back in the pool before the step reserves
    the others' (else a sequence that fits the pool alone failed 'out of KV-cache pages' beside it)."""
    from nld_trt.decoding.ar import ARSequence
    from nld_trt.errors import GenerationError

    class FailsAt(ARSequence):
        def next_chunk(self):
            if len(self.out) == 22:
                raise GenerationError("this request's own rule failed")
            return super().next_chunk()

    ex = ToyExecutor(CONFIG, max_batch=2, max_seq_len=64, kv_cache_tokens=68)
    pages = PageManager(ex.layout.pages, ex.layout.page_size, prefix_cache=False)
    failing = FailsAt([1] + list(range(10, 30)), params("ar", max_new_tokens=26), CONFIG, 0)
    other = SEQUENCE_TYPES["ar"]([1, 5, 6], params("ar", max_new_tokens=40), CONFIG, 1)
    run(ex, [failing, other], pages=pages)
    alone = decode(ToyExecutor(CONFIG, max_batch=2), [[1, 5, 6]], "ar", max_new_tokens=40)[0]
    assert "own rule failed" in failing.error
    assert other.error is None and other.out == alone.out
    assert pages.in_use == 0
    pages.check()


def test_a_cancelled_request_leaves_at_the_next_step_even_behind_one_waiting_for_pages():
    """Waiting requests hold no pages, but their clients wait for the answer: one cancelled behind a request that
    waits for pages (first in the queue) is completed at the next step, not once that request gets its pages."""
    ex = ToyExecutor(CONFIG, max_batch=4, max_seq_len=64, kv_cache_tokens=64)
    pages = PageManager(ex.layout.pages, ex.layout.page_size)
    batcher = Batcher(ex, pages=pages)
    running = SEQUENCE_TYPES["ar"]([1] + list(range(10, 40)), params("ar", max_new_tokens=30), CONFIG, 0)
    blocked = SEQUENCE_TYPES["ar"]([1] + list(range(20, 50)), params("ar", max_new_tokens=30), CONFIG, 1)
    behind = SEQUENCE_TYPES["ar"]([1, 5, 6], params("ar", max_new_tokens=30), CONFIG, 2)
    batcher.submit(running)
    batcher.step()
    batcher.submit(blocked)
    batcher.submit(behind)
    batcher.step()
    assert batcher.active == [running] and list(batcher.waiting) == [blocked, behind]  # blocked waits for pages
    batcher.cancel(behind)
    left = batcher.step()
    assert left == [behind] and behind.finish_reason == "cancelled" and list(batcher.waiting) == [blocked]
    while not batcher.idle:
        batcher.step()
    assert running.error is None and blocked.error is None and len(blocked.out) == 30
    assert pages.in_use == 0
    pages.check()
