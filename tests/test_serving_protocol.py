"""Request parsing and the continuous-batching scheduler, without Triton (a list stands in for the client)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from nld_trt.errors import GenerationError
from nld_trt.serving.backend import Scheduler, Update
from nld_trt.serving.protocol import INPUT_TYPES, Limits, gather, prepare

LIMITS = Limits(max_tokens_cap=64, default_max_tokens=16, streaming=True)


NUMPY = {"TYPE_STRING": np.object_, "TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
         "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16}


def fields(**kw):
    """Inputs as the Triton backend hands them over: [1, 1] arrays of the declared type ([1, N] for lists)."""
    arrays = {}
    for k, v in kw.items():
        items = v if isinstance(v, list) else [v]
        items = [x.encode() if isinstance(x, str) else x for x in items]
        arrays[k] = np.array([items], dtype=NUMPY[INPUT_TYPES[k].dtype])
    return gather(arrays, None)


@pytest.mark.parametrize("request_fields, message", [
    (dict(text_input="hi", mode="foo"), "unknown mode 'foo'"),
    (dict(text_input="hi", max_tokens=0), r"max_tokens must be an integer in \[1, 2147483647\], got 0"),
    (dict(text_input="hi", max_tokens=65), "over this deployment's cap of 64"),
    (dict(text_input="hi", block_length=0), "block_length must be an integer"),
    (dict(text_input="hi", block_length=4096), "block_length must be an integer"),
    (dict(text_input="hi", threshold=1.5), r"threshold must be a number in \[0, 1\], got 1.5"),
    (dict(max_tokens=4), "missing text_input"),
    (dict(text_input=b"ok \xff\xfe"), r"not valid UTF-8 \(byte 0xff at position 3\)"),
    (dict(text_input="hi " * 600), "needs .* KV-cache positions, more than the 512"),
    (dict(text_input="hi", end_id=10**6), "end_id must be a token id"),
    (dict(messages="[not json"), "messages is not valid JSON"),
    (dict(messages='[{"role": "user"}]'), "messages must be a non-empty JSON list"),
])
def test_bad_requests_are_named(tiny, request_fields, message):
    with pytest.raises(GenerationError, match=message):
        prepare(tiny, fields(**request_fields), LIMITS)


def test_one_prompt_per_request(tiny):
    two = {"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_)}
    with pytest.raises(GenerationError, match="one prompt per request"):
        prepare(tiny, gather(two, None), LIMITS)


def test_stream_needs_the_decoupled_model(tiny):
    with pytest.raises(GenerationError, match="decoupled model `nld`"):
        prepare(tiny, fields(text_input="hi", stream=True), Limits(64, 16, streaming=False))


def test_fields_map_to_generation_params(tiny):
    p = prepare(tiny, fields(text_input="hi", mode="dlm", threshold=0.9, block_length=8, max_tokens=9, end_id=5), LIMITS)
    assert p.params.threshold == 0.9  # FP32 on the wire, the decimal the client meant here
    assert (p.params.mode, p.params.block_length, p.params.max_new_tokens, p.params.eos_token_ids) == ("dlm", 8, 9, (5,))
    assert p.prompt_ids == tiny.encode("hi") and not p.stream
    # request parameters fill gaps, input tensors win, random_seed is TensorRT-LLM's name for seed
    g = gather({"mode": np.array([[b"ar"]], dtype=np.object_), "random_seed": np.array([[7]], dtype=np.uint64)},
               '{"mode": "dlm", "max_tokens": 3, "text_input": "hi"}')
    assert g == {"mode": b"ar", "max_tokens": 3, "text_input": "hi", "seed": 7}
    raw = prepare(tiny, fields(text_input="hi", chat=False), LIMITS)
    assert raw.prompt_ids == tiny.encode("hi", chat=False) != p.prompt_ids
    conversation = '[{"role": "user", "content": "hi"}]'
    assert prepare(tiny, fields(messages=conversation), LIMITS).prompt_ids == p.prompt_ids


class ListSink:
    """A client that keeps what it is sent."""

    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.gone = False

    def send(self, u: Update) -> bool:
        self.updates.append(u)
        if u.final:
            self.done.set()
        return True

    def error(self, message: str) -> None:
        self.errors.append(message)
        self.done.set()

    def cancelled(self) -> bool:
        return self.gone

    def close_cancelled(self) -> None:
        self.done.set()

    def ids(self) -> list[int]:
        return [t for u in self.updates for t in u.token_ids]


REQUESTS = [(prompt, mode, n, stream) for prompt, n in (("Tom has 12 apples.", 11), ("hi", 17), ("A pack holds 6 pens.", 6))
            for stream in (True, False) for mode in ("ar", "dlm", "linear_spec")]


def test_scheduler_batches_mixed_modes_and_matches_generate(tiny):
    want = [tiny.generate(p, mode=m, max_new_tokens=n, block_length=8) for p, m, n, _ in REQUESTS]
    scheduler = Scheduler(tiny)
    seen_modes: list[set[str]] = []
    report = scheduler._report
    scheduler._report = lambda: (seen_modes.append({s.params.mode for s in scheduler.batcher.active}), report())
    try:
        sinks = []
        for p, m, n, stream in REQUESTS:
            sink = ListSink()
            prepared = prepare(tiny, fields(text_input=p, mode=m, max_tokens=n, block_length=8, stream=stream), LIMITS)
            scheduler.submit(prepared, sink)
            sinks.append(sink)
        assert all(s.done.wait(60) for s in sinks)
    finally:
        scheduler.stop()
    assert max(len(m) for m in seen_modes) == 3  # all three modes in one batch
    for sink, result, (_, _, _, stream) in zip(sinks, want, REQUESTS):
        final = sink.updates[-1]
        assert sink.ids() == result.token_ids and final.num_tokens == len(result.token_ids)
        assert "".join(u.text for u in sink.updates) == result.text
        assert final.stats["nfe"] == result.stats.nfe and final.finish_reason == result.finish_reason
        if not stream:
            assert len(sink.updates) == 1
        elif result.stats.tokens > 8:  # more than one block: several responses
            assert len(sink.updates) > 1
    assert tiny.pages.in_use == 0


def test_a_cancelled_request_frees_its_slot_at_once(tiny):
    scheduler = Scheduler(tiny)
    try:
        sink, other = ListSink(), ListSink()
        scheduler.submit(prepare(tiny, fields(text_input="hi", max_tokens=64, stream=True), LIMITS), sink)
        while not sink.updates:
            time.sleep(0.001)
        assert scheduler.slots_in_use == 1
        sink.gone = True
        assert sink.done.wait(10) and not sink.updates[-1].final
        scheduler.submit(prepare(tiny, fields(text_input="hi", max_tokens=2), LIMITS), other)
        assert other.done.wait(10)
        assert other.updates[-1].stats["slots_in_use"] == 0 and other.updates[-1].stats["cancelled_total"] == 1
    finally:
        scheduler.stop()
    assert len(sink.updates) < 64


def test_a_failing_step_answers_with_an_error_and_the_scheduler_carries_on(tiny, monkeypatch):
    scheduler = Scheduler(tiny)
    try:
        broken, fine = ListSink(), ListSink()
        monkeypatch.setattr(scheduler.batcher, "step", lambda: 1 / 0)
        scheduler.submit(prepare(tiny, fields(text_input="hi"), LIMITS), broken)
        assert broken.done.wait(10) and "ZeroDivisionError" in broken.errors[0]
        assert scheduler.slots_in_use == 0
        scheduler.submit(prepare(tiny, fields(text_input="hi", max_tokens=3), LIMITS), fine)
        assert fine.done.wait(10) and fine.updates[-1].num_tokens == 3
    finally:
        scheduler.stop()
