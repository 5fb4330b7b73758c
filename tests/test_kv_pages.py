"""The page manager as plain Python: reference counts, the hash chain and its extra keys, the prefix index,
LRU eviction, the events a KV-aware router receives, and the layout's sizing rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nld_trt.config import NLDConfig
from nld_trt.errors import NLDError
from nld_trt.kv import (CacheCleared, ExtraKey, KVLayout, KVScales, PageManager, PagesRemoved, PagesStored,
                        PageTable, page_hash)

P = 4


def manager(pages=8, **kw):
    events = []
    return PageManager(pages, P, on_event=events.append, **kw), events


def filled(pm: PageManager, tokens: list[int], extra=()) -> PageTable:
    """A sequence that committed `tokens` (pages taken and filled)."""
    t = PageTable(extra=tuple(extra))
    assert pm.grow(t, len(tokens))
    pm.commit(t, tokens)
    return t


def test_the_hash_is_stable_across_processes_and_chains_on_the_parent():
    h = page_hash(None, [1, 2, 3, 4])
    # a fresh interpreter (another hash seed) computes the same value: nothing salted is hashed
    code = "from nld_trt.kv import page_hash; print(page_hash(None, [1, 2, 3, 4]))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"})
    assert int(other.stdout) == h and 0 <= h < 2**64
    assert page_hash(h, [5, 6, 7, 8]) != page_hash(None, [5, 6, 7, 8])  # same tokens, other prefix
    assert page_hash(h, [5, 6, 7, 8]) != page_hash(page_hash(None, [1, 2, 3, 9]), [5, 6, 7, 8])
    assert page_hash(None, [1, 2, 3, 4], (ExtraKey(0, 2, b"img-a"),)) != page_hash(None, [1, 2, 3, 4],
                                                                                   (ExtraKey(0, 2, b"img-b"),))


def test_pages_are_refcounted_and_come_back_free_or_cached():
    pm, _ = manager()
    a = filled(pm, list(range(10)))  # 2 full pages + 2 tokens on a third
    assert len(a.pages) == 3 and pm.in_use == 3 and pm.cached == 2
    b = PageTable()
    pm.adopt(b, pm.lookup(list(range(10)), limit=9), list(range(10)))
    assert b.pages == a.pages[:2] and b.length == 8 and b.cached == 8
    assert [pm.refs[p] for p in a.pages] == [2, 2, 1]
    pm.release(a)
    assert [pm.refs[p] for p in b.pages] == [1, 1] and len(pm.free) == 6  # the partial page is free again
    pm.release(b)
    assert pm.in_use == 0 and pm.available == 8 and pm.cached == 2 and len(pm.lru) == 2
    pm.check()


def test_lookup_takes_the_longest_full_page_prefix_and_respects_the_limit():
    pm, _ = manager()
    prompt = list(range(100, 112))  # three full pages
    pm.release(filled(pm, prompt))
    assert len(pm.lookup(prompt)) == 3
    assert len(pm.lookup(prompt, limit=11)) == 2  # the last prompt token is always computed
    assert len(pm.lookup(prompt[:6] + [0] * 6)) == 1  # diverges in the second page
    assert pm.lookup([7] + prompt[1:]) == []  # diverges in the first page: nothing after it matches
    pm.prefix_cache = False
    assert pm.lookup(prompt) == []


def test_extra_keys_keep_prompts_with_the_same_ids_but_other_images_apart():
    pm, _ = manager()
    prompt = [1, 9, 9, 9, 9, 9, 2, 3, 4]  # pad ids 9 at positions 1..5 stand for an image
    image_a, image_b = (ExtraKey(1, 6, b"sha-a"),), (ExtraKey(1, 6, b"sha-b"),)
    pm.release(filled(pm, prompt, image_a))
    assert len(pm.lookup(prompt, image_a)) == 2
    assert pm.lookup(prompt, image_b) == []  # the image's pages differ from the first one on
    assert pm.lookup(prompt) == []
    # a key that only touches the second page leaves the first one shared
    late = (ExtraKey(5, 6, b"sha-a"),)
    pm.release(filled(pm, prompt, late))
    assert len(pm.lookup(prompt, (ExtraKey(5, 6, b"sha-c"),))) == 1


def test_eviction_is_least_recently_used_and_a_prefix_goes_from_its_end():
    pm, events = manager(pages=6)
    first = list(range(0, 12))  # 3 pages
    second = list(range(50, 62))  # 3 pages
    pm.release(filled(pm, first))
    pm.release(filled(pm, second))
    assert pm.available == 6 and pm.cached == 6 and not pm.free
    events.clear()
    t = PageTable()
    assert pm.grow(t, 8)  # two pages: the least recently used, i.e. the first prompt's last two pages
    assert isinstance(events[0], PagesRemoved) and len(events[0].hashes) == 2
    assert len(pm.lookup(first)) == 1 and len(pm.lookup(second)) == 3
    # using a cached prefix makes it recent again
    u = PageTable()
    pm.adopt(u, pm.lookup(second), second)
    pm.release(u)
    assert pm.grow(t, 12)  # one more page: the first prompt's first page goes, not the second prompt's
    assert pm.lookup(first) == [] and len(pm.lookup(second)) == 3
    assert not pm.grow(t, 100) and len(t.pages) == 3  # asking too much takes nothing
    pm.check()


def test_events_carry_hashes_parents_tokens_and_page_size_in_chain_order():
    pm, events = manager()
    t = filled(pm, [1, 2, 3, 4, 5, 6])
    assert len(events) == 1 and isinstance(events[0], PagesStored) and events[0].page_size == P
    (first,) = events[0].pages
    assert first.token_ids == (1, 2, 3, 4) and first.parent_hash is None and first.hash == t.hashes[0]
    assert pm.grow(t, 12)
    pm.commit(t, [7, 8, 9, 10, 11, 12])
    second, third = events[1].pages
    assert second.parent_hash == first.hash and third.parent_hash == second.hash
    assert second.token_ids == (5, 6, 7, 8) and third.token_ids == (9, 10, 11, 12)
    # the same tokens again (a second sequence computing them): the index already has them, no event
    pm.release(filled(pm, [1, 2, 3, 4, 5, 6, 7, 8]))
    assert len(events) == 2
    pm.release(t)
    pm.clear()
    assert isinstance(events[-1], CacheCleared) and pm.cached == 0 and len(pm.free) == 8
    pm.check()


def test_stored_pages_carry_the_extra_keys_that_entered_their_hash():
    pm, events = manager()
    filled(pm, [1, 9, 9, 9, 9, 2, 3, 4], (ExtraKey(1, 5, b"img"),))
    a, b = events[0].pages
    assert a.extra_keys == (ExtraKey(1, 5, b"img"),) and b.extra_keys == (ExtraKey(1, 5, b"img"),)
    assert a.hash == page_hash(None, [1, 9, 9, 9], a.extra_keys)


def test_no_prefix_cache_frees_everything_and_reports_nothing():
    pm, events = manager(prefix_cache=False)
    pm.release(filled(pm, list(range(12))))
    assert events == [] and pm.cached == 0 and len(pm.free) == 8


def test_commit_past_the_pages_and_double_release_are_refused():
    pm, _ = manager()
    t = PageTable()
    assert pm.grow(t, 4)
    with pytest.raises(NLDError, match="covers 4 positions"):
        pm.commit(t, [1, 2, 3, 4, 5])
    pm.release(t)
    t.pages = [0]
    with pytest.raises(NLDError, match="released more often"):
        pm.release(t)


def test_the_layout_sizes_pages_and_refuses_a_pool_smaller_than_one_sequence():
    c = NLDConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, mask_token_id=31)
    layout = KVLayout.build(c, max_seq_len=100, dtype=torch.float32, tokens=1000, page_size=16)
    assert layout.pages == 63 and layout.scratch == 63 and layout.shape == (64, 16, 1, 8)
    assert layout.table_width == 7 and layout.bytes_per_token == 2 * 2 * 8 * 4
    by_gb = KVLayout.build(c, max_seq_len=100, dtype=torch.float32, gb=1 / 1024, page_size=16)
    assert by_gb.tokens == 8192 and by_gb.nbytes == (512 + 1) * 16 * 128  # 1 MiB / 128 bytes per position
    with pytest.raises(NLDError, match="fewer than the 7 that one sequence of max_seq_len 100 needs: give at least 112"):
        KVLayout.build(c, max_seq_len=100, dtype=torch.float32, tokens=50, page_size=16)
    with pytest.raises(NLDError, match="tokens or in GB, not both"):
        KVLayout.build(c, max_seq_len=100, dtype=torch.float32, tokens=500, gb=1.0)
    with pytest.raises(NLDError, match="page_size must be a positive integer, got 0"):
        KVLayout.build(c, max_seq_len=100, dtype=torch.float32, page_size=0)
    fp8 = KVLayout.build(c, max_seq_len=100, dtype=torch.float32, tokens=1000, scales=(KVScales.from_scales(0.5, 0.25),) * 2)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.bytes_per_token == 2 * 2 * 8
    s = fp8.scales[0]
    assert s.k_quant == 2.0 and s.k_dequant == 0.5 and s.v_quant == 4.0 and s.v_dequant == 0.25
