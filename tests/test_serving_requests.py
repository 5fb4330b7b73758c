"""The Triton models' request fields (TensorRT-LLM's names, types and shapes, NLD's own) and what the
scheduler sends for them (stop strings held back, several sequences, logprobs, reasoning, echo), without
Triton: a list stands in for the client."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from nld_trt.errors import GenerationError
from nld_trt.serving.backend import Scheduler
from nld_trt.serving.protocol import Limits, Prepared, gather, prepare
from test_serving_protocol import LIMITS, ListSink, fields

PROMPT = "Tom has 12 apples."


def run(nld, *prepared: Prepared, timeout: float = 60) -> list[ListSink]:
    scheduler = Scheduler(nld)
    try:
        sinks = [ListSink() for _ in prepared]
        for p, sink in zip(prepared, sinks):
            scheduler.submit(p, sink)
        assert all(s.done.wait(timeout) for s in sinks)
    finally:
        scheduler.stop()
    assert nld.pages.in_use == 0
    return sinks


def test_tensorrt_llm_request_shapes_are_accepted(tiny):
    """Exactly what TensorRT-LLM's end_to_end_grpc_client.py / the ensemble send: [1, 1] tensors of the
    ensemble's types, lists [1, N], optional outputs asked for."""
    inputs = {
        "text_input": np.array([[b"hi"]], dtype=object),
        "max_tokens": np.array([[8]], dtype=np.int32),
        "stream": np.array([[False]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[0.7]], dtype=np.float32),
        "top_k": np.array([[5]], dtype=np.int32),
        "top_p": np.array([[0.9]], dtype=np.float32),
        "seed": np.array([[2**63 + 5]], dtype=np.uint64),
        "num_return_sequences": np.array([[1]], dtype=np.int32),
        "bad_words": np.array([[""]], dtype=object),
        "stop_words": np.array([["never", ""]], dtype=object),
        "exclude_input_in_output": np.array([[True]], dtype=bool),
        "return_log_probs": np.array([[True]], dtype=bool),
        "end_id": np.array([[2]], dtype=np.int32),
        "pad_id": np.array([[2]], dtype=np.int32),
        "repetition_penalty": np.array([[1.0]], dtype=np.float32),
        "presence_penalty": np.array([[0.0]], dtype=np.float32),
        "frequency_penalty": np.array([[0.0]], dtype=np.float32),
        "return_context_logits": np.array([[False]], dtype=bool),
        "lora_weights": np.zeros((1, 0, 0), dtype=np.float16),
    }
    p = prepare(tiny, gather(inputs, None), LIMITS)
    assert (p.params.temperature, p.params.top_k, p.params.top_p, p.params.seed) == (0.7, 5, 0.9, 2**63 + 5)
    assert p.params.stop == ("never",) and p.params.logprobs and p.params.eos_token_ids == (2,)
    sink, = run(tiny, p)
    want = tiny.generate("hi", max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, seed=2**63 + 5,
                         eos_token_ids=(2,), logprobs=True)
    assert sink.ids() == want.token_ids
    assert [e["logprob"] for u in sink.updates for e in u.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs])


@pytest.mark.parametrize("request_fields, message", [
    (dict(text_input="hi", beam_width=4), r"beam_width is not supported by nld-trt: got 4, only 1 is accepted"),
    (dict(text_input="hi", embedding_bias_words=["bad"]), r"embedding_bias_words is not supported by nld-trt: got \['bad'\]"),
    (dict(text_input="hi", bad_words=["apples"] * 300), "at most 256 bad_words per request"),
    (dict(text_input="hi", prompt_logprobs=21), r"prompt_logprobs must be an integer in \[0, 20\], got 21"),
    (dict(text_input="hi", max_tokens=0, prompt_logprobs=-1), r"prompt_logprobs must be an integer in \[0, 20\]"),
    (dict(text_input="hi", repetition_penalty=1.3), "repetition_penalty is not supported by nld-trt: got 1.3"),
    (dict(text_input="hi", frequency_penalty=0.5), "frequency_penalty is not supported"),
    (dict(text_input="hi", return_generation_logits=True), "return_generation_logits is not supported"),
    (dict(text_input="hi", lora_task_id=3), "lora_task_id is not supported by nld-trt: got 3, only absent or empty"),
    (dict(text_input="hi", top_k=-2), r"top_k must be an integer in \[0, 512\], got -2"),
    (dict(text_input="hi", top_p=1.5), r"top_p must be a number in \[0, 1\], got 1.5"),
    (dict(text_input="hi", min_p=-1.0), r"min_p must be a number in \[0, 1\], got -1.0"),
    (dict(text_input="hi", top_logprobs=3), "top_logprobs needs return_log_probs=true"),
    (dict(text_input="hi", num_return_sequences=0), r"num_return_sequences must be an integer in \[1, 8\], got 0"),
    (dict(text_input="hi", stop_token_ids=[99999]), r"stop_token_ids must be a token id in \[0, 512\)"),
    (dict(text_input="hi", input_ids=[1, 2]), "send one of text_input, messages and input_ids"),
    (dict(input_ids=[1, 99999]), r"input_ids must be token ids in \[0, 512\), got 99999"),
    (dict(text_input="hi", chat_template_kwargs="[1]"), "chat_template_kwargs must be a JSON object"),
    (dict(text_input="hi", chat_template_kwargs="{"), "chat_template_kwargs is not valid JSON"),
    (dict(text_input="hi", mode="auto?"), "unknown mode 'auto\\?'"),
])
def test_bad_fields_are_named(tiny, request_fields, message):
    with pytest.raises(GenerationError, match=message):
        prepare(tiny, fields(**request_fields), LIMITS)


@pytest.mark.parametrize("parameters, message", [
    ({"max_token": 8}, r"unknown request parameter 'max_token': the known ones are .*max_tokens"),
    ({"seed": 1e30, "temperature": 0.5}, r"seed must be an integer in \[0, 18446744073709551615\], got 1000000000000000019884624838656"),
    ({"seed": 2**64}, r"seed must be an integer in \[0, 18446744073709551615\]"),
    ({"random_seed": -1}, r"seed must be an integer in \[0, 18446744073709551615\], got -1"),
    ({"max_tokens": "16"}, "max_tokens must be an integer, got '16'"),
    ({"max_tokens": 1.5}, "max_tokens must be an integer, got 1.5"),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"chat": "maybe"}, "chat must be true or false, got 'maybe'"),
    ({"max_tokens": 4294967312}, r"max_tokens must be an integer in \[1, 2147483647\], got 4294967312"),
    ({"block_length": 4294967304}, r"block_length must be an integer in \[1, 128\], got 4294967304"),
    ({"bad_words_list": [[5, 6], [3, -1]]}, r"bad_words_list: the offsets \(row 1\) must rise within the 2 ids"),
    ({"bad_words_list": [[5, 6]]}, r"bad_words_list must be \[\[token ids...\], \[end offsets...\]\]"),
])
def test_bad_request_parameters_are_named(tiny, parameters, message):
    with pytest.raises(GenerationError, match=message):
        prepare(tiny, gather({"text_input": np.array([[b"hi"]], dtype=object)}, parameters), LIMITS)


def test_top_p_zero_means_off_as_in_tensorrt_llm(tiny):
    assert prepare(tiny, fields(text_input="hi", top_p=0.0), LIMITS).params.top_p == 1.0


def test_a_huge_prompt_is_refused_before_it_is_tokenized(tiny, monkeypatch):
    monkeypatch.setattr(tiny.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a prompt over the cap"))
    with pytest.raises(GenerationError, match="text_input is 10000000 bytes, over this deployment's cap of 65536"):
        prepare(tiny, fields(text_input="x" * 10_000_000), LIMITS)
    with pytest.raises(GenerationError, match="messages is 70000 bytes"):
        prepare(tiny, fields(messages="[" + " " * 69998 + "]"), LIMITS)


def test_a_request_that_cannot_start_fails_alone_and_its_neighbours_finish(tiny):
    good = [prepare(tiny, fields(text_input=PROMPT, max_tokens=12, mode=m, stream=True), LIMITS)
            for m in ("ar", "dlm", "linear_spec")]
    ok = prepare(tiny, fields(text_input="hi", max_tokens=4, stop_words=["x"]), LIMITS)
    bad = Prepared(ok.prompt_ids, replace(ok.params, stop=(5,)), False)  # a value validation would refuse
    sinks = run(tiny, good[0], bad, good[1], good[2])
    assert "could not start the request (TypeError" in sinks[1].errors[0]
    for sink, p in zip([sinks[0], sinks[2], sinks[3]], good):
        want = tiny.generate(PROMPT, mode=p.params.mode, max_new_tokens=12)
        assert not sink.errors and sink.ids() == want.token_ids


def test_a_failure_inside_a_step_fails_only_its_request(tiny, monkeypatch):
    from nld_trt.decoding.linear_spec import LinearSpecSequence

    consume = LinearSpecSequence.consume

    def broken(self, logits):
        if self.params.max_new_tokens == 13:  # the request that carries the bug
            raise RuntimeError("boom")
        return consume(self, logits)

    monkeypatch.setattr(LinearSpecSequence, "consume", broken)
    bad = prepare(tiny, fields(text_input=PROMPT, max_tokens=13, mode="linear_spec"), LIMITS)
    good = [prepare(tiny, fields(text_input=PROMPT, max_tokens=12, mode=m), LIMITS) for m in ("ar", "linear_spec")]
    sinks = run(tiny, good[0], bad, good[1])
    assert "the request failed while decoding (RuntimeError: boom)" in sinks[1].errors[0]
    assert not sinks[0].errors and not sinks[2].errors
    monkeypatch.setattr(LinearSpecSequence, "consume", consume)
    assert sinks[2].ids() == tiny.generate(PROMPT, mode="linear_spec", max_new_tokens=12).token_ids


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_streaming_with_a_stop_string_sends_exactly_the_unary_text(tiny, mode):
    free = tiny.generate(PROMPT, mode=mode, max_new_tokens=40, block_length=8)
    stop = next(free.text[i : i + 3] for i in range(6, len(free.text) - 3)
                if free.text.find(free.text[i : i + 3]) == i and free.text[i : i + 3].strip())
    kw = dict(text_input=PROMPT, mode=mode, max_tokens=40, block_length=8, stop_words=[stop])
    streamed, unary = run(tiny, prepare(tiny, fields(stream=True, **kw), LIMITS), prepare(tiny, fields(**kw), LIMITS))
    text = free.text[: free.text.find(stop)]
    assert unary.updates[-1].text == text and unary.updates[-1].finish_reason == "stop"
    assert "".join(u.text for u in streamed.updates) == text
    assert all(stop not in u.text for u in streamed.updates)
    assert streamed.updates[-1].stats["stop_reason"] == stop


def test_num_return_sequences_decodes_them_together_with_seed_plus_i(tiny):
    p = prepare(tiny, fields(text_input=PROMPT, max_tokens=10, temperature=1.0, seed=5, num_return_sequences=3,
                             stream=True, mode="linear_spec", block_length=4), LIMITS)
    sink, = run(tiny, p)
    want = tiny.generate([PROMPT] * 3, max_new_tokens=10, temperature=1.0, seed=5, mode="linear_spec", block_length=4)
    by_index = {i: [t for u in sink.updates if u.sequence_index == i for t in u.token_ids] for i in range(3)}
    assert [by_index[i] for i in range(3)] == [r.token_ids for r in want]
    assert [u.final for u in sink.updates].count(True) == 1 and sink.updates[-1].final
    assert sorted(u.sequence_index for u in sink.updates if u.finished) == [0, 1, 2]
    with pytest.raises(GenerationError, match="num_return_sequences > 1 needs the decoupled model"):
        prepare(tiny, fields(text_input=PROMPT, num_return_sequences=2), Limits(64, 16, streaming=False))


def test_thinking_is_sent_apart_from_the_answer(tiny):
    kw = dict(text_input=PROMPT, max_tokens=12, chat_template_kwargs='{"enable_thinking": true}',
              max_thinking_tokens=5, separate_reasoning=True)
    streamed, unary = run(tiny, prepare(tiny, fields(stream=True, **kw), LIMITS), prepare(tiny, fields(**kw), LIMITS))
    ids = unary.updates[-1].token_ids
    end = tiny.tokenizer.token_id("[/THINK]")
    assert ids[5] == end
    decode = tiny.tokenizer.decode
    assert unary.updates[-1].reasoning == decode(ids[:5]) and unary.updates[-1].text == decode(ids[6:])
    assert "".join(u.reasoning for u in streamed.updates) == decode(ids[:5])
    assert "".join(u.text for u in streamed.updates) == decode(ids[6:])


def test_exclude_input_in_output_false_echoes_the_prompt_as_tensorrt_llm(tiny):
    p = prepare(tiny, fields(text_input=PROMPT, max_tokens=6, exclude_input_in_output=False), LIMITS)
    sink, = run(tiny, p)
    want = tiny.generate(PROMPT, max_new_tokens=6)
    assert sink.updates[-1].token_ids == want.prompt_token_ids + want.token_ids
    assert sink.updates[-1].text == tiny.tokenizer.decode(want.prompt_token_ids) + want.text


def test_input_ids_are_a_prompt(tiny):
    ids = tiny.encode(PROMPT)
    sink, = run(tiny, prepare(tiny, fields(input_ids=ids, max_tokens=6), LIMITS))
    assert sink.ids() == tiny.generate(ids, max_new_tokens=6).token_ids


def test_a_sender_that_falls_behind_merges_a_sequences_waiting_deltas(tiny):
    """Each send waits 30 ms (a slow IPC): deltas queue up and go out merged, and the streamed text and ids
    are still exactly the unary ones."""

    class SlowSink(ListSink):
        def send(self, u):
            time.sleep(0.03)
            return super().send(u)

    kw = dict(text_input=PROMPT, max_tokens=40, mode="ar")
    scheduler = Scheduler(tiny)
    try:
        slow = SlowSink()
        scheduler.submit(prepare(tiny, fields(stream=True, **kw), LIMITS), slow)
        assert slow.done.wait(60)
    finally:
        scheduler.stop()
    want = tiny.generate(PROMPT, max_new_tokens=40)
    assert slow.ids() == want.token_ids and "".join(u.text for u in slow.updates) == want.text
    assert len(slow.updates) < len(want.token_ids) / 2  # merged: far fewer responses than ar steps
    assert [u.num_tokens for u in slow.updates] == sorted(u.num_tokens for u in slow.updates)


def test_bad_words_strings_and_the_trtllm_ids_form_become_the_same_words(tiny):
    ids = tiny.tokenizer.encode("apples", add_special_tokens=False)
    listed = np.array([[ids + [7, 8], [len(ids), len(ids) + 2] + [-1] * len(ids)]], dtype=np.int32)  # [1, 2, N]
    p = prepare(tiny, gather({"text_input": np.array([[b"hi"]], dtype=object), "bad_words_list": listed,
                              "bad_words": np.array([[b"apples", b""]], dtype=object)}, None), LIMITS)
    assert p.params.bad_words == (tuple(ids), tuple(ids), (7, 8))
    with pytest.raises(GenerationError, match=r"bad_words_list must hold one \[2, N\] list per request"):
        prepare(tiny, gather({"text_input": np.array([[b"hi"]], dtype=object),
                              "bad_words_list": np.concatenate([listed, listed])}, None), LIMITS)


def test_prompt_logprobs_go_out_with_each_sequences_first_response(tiny):
    ids = [1, 40, 41, 42, 7]
    p = prepare(tiny, fields(input_ids=ids, max_tokens=4, prompt_logprobs=2, stream=True, num_return_sequences=2,
                             temperature=1.0), LIMITS)
    sink, = run(tiny, p)
    firsts = {}
    for u in sink.updates:
        if u.prompt_logprobs is not None:
            assert u.sequence_index not in firsts  # once per sequence
            firsts[u.sequence_index] = u.prompt_logprobs
    want = tiny.generate(ids, max_new_tokens=1, prompt_logprobs=2).prompt_logprobs
    assert sorted(firsts) == [0, 1] and firsts[0] == firsts[1]
    entries = firsts[0]
    assert entries[0]["logprob"] is None and entries[0]["token_id"] == ids[0]
    assert [e["token_id"] for e in entries] == ids
    assert [e["logprob"] for e in entries[1:]] == pytest.approx([lp.logprob for lp in want[1:]])
    assert [e["rank"] for e in entries[1:]] == [lp.rank for lp in want[1:]]
    assert [[t["token_id"] for t in e["top_logprobs"]] for e in entries[1:]] == [[t for t, _ in lp.top] for lp in want[1:]]


def test_max_tokens_zero_scores_the_prompt_and_finishes(tiny):
    sink, = run(tiny, prepare(tiny, fields(text_input=PROMPT, max_tokens=0, prompt_logprobs=0), LIMITS))
    u, = sink.updates
    assert u.final and u.finish_reason == "length" and u.token_ids == [] and len(u.prompt_logprobs) == u.num_input_tokens
