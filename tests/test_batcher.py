"""Continuous batching: requests of every mode share steps, join mid-flight and leave when cancelled,
and each still gets exactly its solo result."""

from __future__ import annotations

from nld_trt.decoding import SEQUENCE_TYPES, Batcher, GenerationParams
from nld_trt.executors import TorchExecutor

PROMPTS = [[1, 20, 21, 22], [1, 30, 31], [1, 40, 41, 42, 43, 44], [1, 50], [1, 60, 61, 62, 63], [1, 70, 71]]
MODES = ["ar", "dlm", "linear_spec", "linear_spec", "dlm", "ar"]


def sequences(model, **params):
    out = []
    for i, (p, mode) in enumerate(zip(PROMPTS, MODES)):
        gp = GenerationParams(mode=mode, max_new_tokens=20 + 3 * i, block_length=8, eos_token_ids=(), **params)
        gp = gp.resolved(model.config)
        out.append(SEQUENCE_TYPES[mode](p, gp, model.config, 0))
    return out


def solo(model, seq):
    return model.generate(seq.prompt, mode=seq.mode, max_new_tokens=seq.params.max_new_tokens, block_length=8,
                          eos_token_ids=()).token_ids


def test_mixed_modes_in_one_batch_equal_their_solo_results(tiny):
    executor = TorchExecutor(tiny.model, max_batch=4, max_seq_len=256)  # 6 requests, 4 slots: some wait
    batcher = Batcher(executor)
    seqs = sequences(tiny)
    for s in seqs:
        batcher.submit(s)
    widths = []
    while not batcher.idle:
        batcher.step()
        widths.append(len(batcher.active))
    assert max(widths) == 4 and batcher.pages.in_use == 0
    batcher.pages.check()
    for s in seqs:
        assert s.done and s.out == solo(tiny, s), s.mode


def test_join_mid_flight_and_cancel_free_the_pages(tiny):
    executor = TorchExecutor(tiny.model, max_batch=2, max_seq_len=256)
    batcher = Batcher(executor)
    first, second, third = sequences(tiny)[2:5]
    batcher.submit(first)
    for _ in range(3):
        batcher.step()
    batcher.submit(second)
    batcher.step()
    held = batcher.pages.in_use
    assert len(batcher.active) == 2 and held == len(first.kv.pages) + len(second.kv.pages)
    batcher.cancel(second)
    left = batcher.step()
    assert left == [second] and second.finish_reason == "cancelled"
    assert batcher.pages.in_use == len(first.kv.pages) and not second.kv.pages
    batcher.submit(third)
    while not batcher.idle:
        batcher.step()
    assert first.out == solo(tiny, first) and third.out == solo(tiny, third)
    assert batcher.pages.in_use == 0
