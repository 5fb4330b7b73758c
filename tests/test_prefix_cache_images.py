"""Prefix caching with images, against the plain path (the prefix cache off): an image prompt's KV pages are
keyed by its images' content (span + digest), so the next turn of a chat with the same picture reuses them and
needs no encode, a different picture behind the same pad ids never shares an image page, a prefill that starts
inside an image (its cached prefix cut short by eviction) gets the rest of the image's rows, and image
sequences preempted and resumed re-prefill with their rows."""

from __future__ import annotations

import pytest

from nld_trt import load
from nld_trt.kv.pages import PageTable

from test_vlm_generate import chat, picture

PAGE = 16
SYSTEM = [{"role": "system", "content": "You are a careful assistant who looks closely at every picture."}]


def ask(image, question: str = "What is it?") -> list[dict]:
    return SYSTEM + chat(image, question)


@pytest.fixture(scope="module")
def hot(tiny_vlm_dir):
    return load(tiny_vlm_dir, max_batch=4, max_seq_len=512, page_size=PAGE)


@pytest.fixture(scope="module")
def cold(tiny_vlm_dir):
    return load(tiny_vlm_dir, max_batch=4, max_seq_len=512, page_size=PAGE, prefix_cache=False)


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_the_next_turn_with_the_same_image_reuses_its_pages_and_gives_the_plain_tokens(hot, cold, mode):
    image = picture(112, 112, {"ar": 21, "dlm": 22, "linear_spec": 23}[mode])
    first = hot.generate(ask(image), mode=mode, max_new_tokens=12)
    assert first.stats.cached_tokens < first.images[0]["start"]  # a picture never seen: its pages are new
    encoded, misses = hot.image_encoder.encoded_images, hot.image_encoder.misses
    turn2 = ask(image) + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And its colour?"}]
    second = hot.generate(turn2, mode=mode, max_new_tokens=12)
    assert second.images[0]["digest"] == first.images[0]["digest"]
    assert second.stats.cached_tokens >= second.images[0]["end"]  # every image position came from the cache
    # ... so the image was not even looked up in the encoder's cache: its rows were not needed
    assert (hot.image_encoder.encoded_images, hot.image_encoder.misses) == (encoded, misses)
    assert first.token_ids == cold.generate(ask(image), mode=mode, max_new_tokens=12).token_ids
    assert second.token_ids == cold.generate(turn2, mode=mode, max_new_tokens=12).token_ids


def test_a_different_image_behind_the_same_ids_shares_no_image_page(hot, cold):
    a, b = picture(112, 112, 31), picture(112, 112, 32)  # one size: the same pad ids
    pa, pb = (hot.prompts.encode(ask(x), local_files=True) for x in (a, b))
    assert pa.ids == pb.ids and pa.spans[0][2] != pb.spans[0][2]
    with_a = hot.generate(ask(a), mode="ar", max_new_tokens=10, eos_token_ids=())
    with_b = hot.generate(ask(b), mode="ar", max_new_tokens=10, eos_token_ids=())
    start = with_b.images[0]["start"]
    # the system prompt's pages before the image are shared, none that holds an image position
    assert with_b.stats.cached_tokens == start // PAGE * PAGE > 0
    assert with_b.token_ids == cold.generate(ask(b), mode="ar", max_new_tokens=10, eos_token_ids=()).token_ids
    assert with_b.token_ids != with_a.token_ids  # the pictures do change the answer: a shared page would show


def evict_to(nld, keep: int) -> None:
    """Leave only the first `keep` pages of the one cached chain in the prefix index: take every free page and
    then cached ones (least recently used first, so the chain is evicted from its end), and give them back."""
    pages = nld.pages
    assert pages.in_use == 0 and pages.cached > keep
    table = PageTable()
    assert pages.grow(table, (len(pages.free) + pages.cached - keep) * pages.page_size)
    pages.release(table)
    assert pages.cached == keep


@pytest.mark.parametrize("piece", [None, 7])
def test_a_cached_prefix_that_ends_inside_an_image_prefills_the_rest_of_its_rows(tiny_vlm_dir, cold, piece):
    nld = load(tiny_vlm_dir, max_batch=2, max_seq_len=512, page_size=PAGE)
    if piece:  # prefill pieces that start inside the image too
        nld.executor.max_prefill_chunk = piece
    prompt = ask(picture(224, 224, 41))
    first = nld.generate(prompt, mode="ar", max_new_tokens=10, eos_token_ids=())
    start, end = first.images[0]["start"], first.images[0]["end"]
    keep = start // PAGE + 1
    assert start < keep * PAGE < end - PAGE  # the cut leaves more than a page of the image to prefill
    evict_to(nld, keep)
    for mode in ("ar", "linear_spec"):
        again = nld.generate(prompt, mode=mode, max_new_tokens=10, eos_token_ids=())
        assert again.stats.cached_tokens == keep * PAGE if mode == "ar" else again.stats.cached_tokens > end
        assert again.token_ids == first.token_ids == cold.generate(prompt, mode=mode, max_new_tokens=10,
                                                                     eos_token_ids=()).token_ids


def test_image_sequences_preempted_and_resumed_give_the_plain_tokens(tiny_vlm_dir, cold):
    """A pool of 20 pages for three image requests of about 9 pages each that grow while they decode: the newest
    give their pages back and re-prefill their prompts (image rows included) and committed tokens."""
    small = load(tiny_vlm_dir, max_batch=3, max_seq_len=256, page_size=PAGE, kv_cache_tokens=20 * PAGE)
    prompts = [ask(picture(112, 112, 51 + i), q) for i, q in enumerate(["What is it?", "Describe it.", "Why?"])]
    want = [r.token_ids for r in cold.generate(prompts, mode="linear_spec", max_new_tokens=40, eos_token_ids=())]
    got = small.generate(prompts, mode="linear_spec", max_new_tokens=40, eos_token_ids=())
    assert small.pages.stats.preemptions > 0 and sum(r.stats.recomputed_tokens for r in got) > 0
    assert [r.token_ids for r in got] == want
    small.pages.check()
    assert small.pages.in_use == 0


def test_prefill_chunks_carry_the_image_rows_of_any_range(hot):
    """The rows of positions [start, start + n) are the whole prompt's rows at those positions, wherever the range
    starts and ends (inside an image, across two, past the prompt into committed output after a preemption)."""
    from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams

    b, c = picture(40, 70, 2), picture(29, 29, 3)
    prompt = hot.prompts.encode(chat("Compare", b, "with", c, "please."), local_files=True)
    params = GenerationParams(mode="ar", max_new_tokens=4).resolved(hot.config)
    seq = SEQUENCE_TYPES["ar"](prompt.ids, params, hot.config, 0, images=hot.bind_images(prompt))
    assert [(k.start, k.end, k.digest.hex()) for k in seq.extra_keys] == prompt.spans
    whole = seq.prefill_chunk(0, prompt.ids).embeds
    rows = {p: whole.rows[i] for i, p in enumerate(whole.positions)}
    tokens = prompt.ids + [5, 6, 7]  # committed output after the prompt
    n = len(prompt.ids)
    for start in range(0, n + 2):
        for length in (1, 3, 8, n):
            chunk = seq.prefill_chunk(start, tokens[start : start + length])
            assert chunk.tokens == tokens[start : start + length]
            want = [p - start for p in rows if start <= p < start + length]
            if not want:
                assert chunk.embeds is None
                continue
            assert list(chunk.embeds.positions) == want
            for i, p in enumerate(chunk.embeds.positions):
                assert bool((chunk.embeds.rows[i] == rows[start + p]).all())
