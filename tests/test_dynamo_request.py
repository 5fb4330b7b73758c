"""The Dynamo worker's pure parts, without Dynamo or a server: a request Dynamo's frontend preprocessed becomes the
same model inputs as the same body sent to nld-trt's OpenAI front end (one mapping), NLD's fields as annotations,
the refusals, the BOS a text completion lacks, the chunks the worker yields, and the KV events relayed to
Dynamo's publisher (the wire format, the snapshot a late subscriber gets).

The served behaviour (every mode's tokens through a real Dynamo frontend, errors, disconnects, routing) is in
test_dynamo_cluster.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nld_trt import load
from nld_trt.errors import NLDError
from nld_trt.runtime import default_model_path
from nld_trt.serving import kv_events
from nld_trt.serving.dynamo.kv import KVPublisher, signed64
from nld_trt.serving.dynamo.request import annotations, describe, leading_special_tokens
from nld_trt.serving.dynamo.worker import NLDWorker, dynamo_chunk
from nld_trt.serving.openai.mapping import RequestError
from nld_trt.serving.openai.schema import ChatRequest, chat_request, parse
from nld_trt.serving.openai.triton import ModelInfo, Piece
from nld_trt.tokenizer import NLDTokenizer

INPUTS = {"text_input": "BYTES", "messages": "BYTES", "input_ids": "INT32", "max_tokens": "INT32", "stream": "BOOL",
          "temperature": "FP32", "seed": "UINT64", "mode": "BYTES", "block_length": "INT32", "threshold": "FP32",
          "chat": "BOOL", "top_k": "INT32", "top_p": "FP32", "min_p": "FP32", "stop_words": "BYTES",
          "stop_token_ids": "INT32", "return_log_probs": "BOOL", "top_logprobs": "INT32",
          "num_return_sequences": "INT32", "max_thinking_tokens": "INT32", "chat_template_kwargs": "BYTES",
          "separate_reasoning": "BOOL", "min_tokens": "INT32", "steps_per_block": "INT32", "acceptance": "BYTES",
          "draft": "BYTES", "lora": "BOOL", "allow_lossy": "BOOL", "bad_words": "BYTES",
          "return_num_input_tokens": "BOOL"}
INFO = ModelInfo("nld", INPUTS, {"max_tokens_cap": "400", "max_block_length": "128", "max_batch": "8",
                                 "max_seq_len": "1024"}, batched=True)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 3 apples. How many?"}]


@pytest.fixture(scope="module")
def tokenizer() -> NLDTokenizer:
    return NLDTokenizer(default_model_path())


def f32(x: float) -> float:
    return float(np.float32(x))


def preprocessed(ids: list[int], **over) -> dict:
    """A request shaped as Dynamo 1.6.1's frontend hands it to a token worker (every option at its null)."""
    request = {
        "model": "nld", "token_ids": ids,
        "stop_conditions": {"max_tokens": None, "stop": None, "stop_token_ids": None, "stop_token_ids_visible": None,
                            "stop_token_ids_hidden": [2], "min_tokens": None, "ignore_eos": None,
                            "max_thinking_tokens": None},
        "sampling_options": {"n": None, "best_of": None, "presence_penalty": None, "frequency_penalty": None,
                             "repetition_penalty": None, "temperature": None, "top_p": None, "top_k": None,
                             "min_p": None, "use_beam_search": None, "length_penalty": None, "seed": None,
                             "include_stop_str_in_output": None, "guided_decoding": None},
        "output_options": {"logprobs": None, "prompt_logprobs": None, "skip_special_tokens": None,
                           "formatted_prompt": None, "return_tokens_as_token_ids": None},
        "eos_token_ids": [2], "annotations": [], "routing": None, "extra_args": None,
    }
    for key, value in over.items():
        if isinstance(value, dict):
            request[key] = {**request[key], **value}
        else:
            request[key] = value
    return request


def test_a_dynamo_request_becomes_the_same_model_inputs_as_the_openai_body(tokenizer):
    body = dict(messages=MESSAGES, max_tokens=32, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, seed=5,
                stop=["\n\n", "###"], n=2, logprobs=True, top_logprobs=3, mode="dlm", block_length=8, threshold=0.8,
                stop_token_ids=[7], min_tokens=2, steps_per_block=4, max_thinking_tokens=16, bad_words=["apple"])
    direct = chat_request(parse(ChatRequest, json.dumps(body).encode()), INFO).fields
    ids = tokenizer.encode_chat(MESSAGES)
    dynamo = preprocessed(
        ids, stop_conditions={"max_tokens": 32, "stop": ["\n\n", "###"], "stop_token_ids": [7], "min_tokens": 2,
                              "max_thinking_tokens": 16},
        sampling_options={"n": 2, "temperature": f32(0.7), "top_p": f32(0.9), "top_k": 20, "min_p": f32(0.05),
                          "seed": 5},
        output_options={"logprobs": 3},
        annotations=["nld.mode=dlm", "nld.block_length=8", "nld.threshold=0.8", "nld.steps_per_block=4",
                     'nld.bad_words=["apple"]', "token_ids"])  # the last is Dynamo's own: left alone
    served = NLDWorker(None, INFO, [1]).requests(dynamo)[0].fields
    assert served.pop("input_ids") == ids
    for name in ("messages", "separate_reasoning"):
        direct.pop(name)
    floats = ("temperature", "top_p", "min_p", "threshold")
    assert {k: v for k, v in served.items() if k not in floats} == {k: v for k, v in direct.items() if k not in floats}
    for name in floats:  # Dynamo's frontend parses floats as float32; the model reads FP32 either way
        assert np.float32(served[name]) == np.float32(direct[name]), name


def test_annotations_carry_json_values_and_bare_strings():
    got = annotations(["nld.mode=linear_spec", "nld.block_length=32", "nld.threshold=0.9", "nld.lora=false",
                       'nld.bad_words=["a b", "c"]', "nld.acceptance=official", "formatted_prompt"])
    assert got == {"mode": "linear_spec", "block_length": 32, "threshold": 0.9, "lora": False,
                   "bad_words": ["a b", "c"], "acceptance": "official"}


@pytest.mark.parametrize("items, words", [
    (["nld.mode"], "has no value"),
    (["nld.speed=3"], "unknown annotation nld.speed"),
    (["nld.top_k=3"], "top_k is a request field of its own"),
    (["nld.mode=ar", "nld.mode=dlm"], "given twice"),
])
def test_bad_annotations_are_refused_naming_them(items, words):
    with pytest.raises(RequestError) as e:
        annotations(items)
    assert words in e.value.message and e.value.param == "nvext.annotations"


@pytest.mark.parametrize("over, words", [
    (dict(annotations=["nld.mode=fast"]), "nld.mode: Input should be 'ar', 'dlm', 'linear_spec' or 'auto'"),
    (dict(annotations=["nld.block_length=abc"]), "nld.block_length: Input should be a valid integer"),
    (dict(sampling_options={"frequency_penalty": f32(0.5)}), "penalties are not supported"),
    (dict(sampling_options={"repetition_penalty": f32(1.2)}), "penalties are not supported"),
    (dict(sampling_options={"guided_decoding": {"json": {"type": "object"}}}), "only plain text output"),
    (dict(sampling_options={"use_beam_search": True}), "beam search is not supported"),
    (dict(sampling_options={"n": 2, "best_of": 3}), "best_of 3 differs from n 2"),
    (dict(stop_conditions={"ignore_eos": True}), "ignore_eos is not supported"),
    (dict(output_options={"prompt_logprobs": 1}), "ask nld-trt's own OpenAI front end"),
    (dict(sampling_options={"temperature": 2.5}), "temperature: Input should be less than or equal to 2"),
    (dict(token_ids=[]), "the prompt is empty"),
])
def test_what_nld_trt_does_not_take_is_refused_as_the_openai_front_end_refuses_it(over, words):
    with pytest.raises(RequestError) as e:
        describe(preprocessed([1, 5, 6], **over), [1])
    assert words in e.value.message


def test_defaults_pass_and_limits_are_the_deployments():
    ok = preprocessed([1, 5, 6], sampling_options={"repetition_penalty": 1.0, "n": 1, "best_of": 1},
                      stop_conditions={"ignore_eos": False}, output_options={"skip_special_tokens": True})
    generation, prompt, outputs = describe(ok, [1])
    assert (generation.n, prompt.ids, outputs.logprobs) == (1, [1, 5, 6], False)
    worker = NLDWorker(None, INFO, [1])
    for over, words in ((dict(stop_conditions={"max_tokens": 500}), "max_tokens 500 is over this deployment's cap of 400"),
                        (dict(annotations=["nld.block_length=200"]), "block_length 200 is over this deployment's"),
                        (dict(sampling_options={"n": 9}), "n 9 is more than this deployment's 8")):
        with pytest.raises(RequestError, match=words):
            worker.requests(preprocessed([1, 5], **over))


def test_a_prompt_without_the_bos_a_raw_encode_adds_gets_it_back(tokenizer):
    bos = leading_special_tokens(tokenizer.encode)
    assert bos == [1]
    text = "Tom has 3 apples"
    dynamo_ids = tokenizer.encode(text, add_special_tokens=False)  # what Dynamo's frontend sends for a completion
    assert describe(preprocessed(dynamo_ids), bos)[1].ids == tokenizer.encode(text)
    chat = tokenizer.encode_chat(MESSAGES)  # the chat template starts with BOS: unchanged
    assert describe(preprocessed(chat), bos)[1].ids == chat
    assert leading_special_tokens(lambda text, special: [5, 6] + ([2] if special else [])) == []  # a suffix: none


def test_each_triton_response_becomes_one_dynamo_chunk():
    entry = {"token_id": 9, "token": " a", "bytes": [32, 97], "logprob": -0.5,
             "top_logprobs": [{"token_id": 9, "token": " a", "bytes": [32, 97], "logprob": -0.5},
                              {"token_id": 4, "token": "b", "bytes": [98], "logprob": -1.5}]}
    piece = Piece(index=1, text=" a a", token_ids=[9, 9], num_tokens=2, nfe=2, tpf=1.0, logprobs=[entry, entry])
    chunk = dynamo_chunk(piece, logprobs=True, top=2)
    assert chunk == {"token_ids": [9, 9], "index": 1, "log_probs": [-0.5, -0.5],
                     "top_logprobs": [[{"rank": 1, "token_id": 9, "token": " a", "logprob": -0.5},
                                       {"rank": 2, "token_id": 4, "token": "b", "logprob": -1.5}]] * 2}
    last = Piece(index=0, text="", token_ids=[2], num_tokens=7, nfe=3, tpf=2.3, finish_reason="eos",
                 stats={"tokens": 7, "prompt_tokens": 12, "cached_tokens": 8})
    assert dynamo_chunk(last, logprobs=False, top=0) == {
        "token_ids": [2], "index": 0, "finish_reason": "eos",
        "completion_usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
                             "prompt_tokens_details": {"cached_tokens": 8}}}


class Recorder:
    """Dynamo's KvEventPublisher push API, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def publish_stored(self, token_ids, num_block_tokens, block_hashes, parent_hash=None) -> None:
        self.calls.append(("stored", token_ids, num_block_tokens, block_hashes, parent_hash))

    def publish_removed(self, block_hashes) -> None:
        self.calls.append(("removed", sorted(block_hashes)))


def page(h: int, parent: int | None, tokens: list[int], extra: bool = False) -> dict:
    return {"hash": h, "parent": parent, "tokens": tokens, "extra": extra}


BIG = (1 << 64) - 5  # an unsigned hash past the signed range


def test_stored_chains_are_published_with_signed_hashes_and_their_parent():
    rec = Recorder()
    pub = KVPublisher(rec, page_size=2)
    pub.apply([{"type": "stored", "page_size": 2, "pages": [page(10, None, [1, 2]), page(BIG, 10, [3, 4])]},
               {"type": "stored", "page_size": 2, "pages": [page(12, BIG, [5, 6]), page(13, 10, [7, 8])]}])
    assert rec.calls == [("stored", [1, 2, 3, 4], [2, 2], [10, signed64(BIG)], None),
                         ("stored", [5, 6], [2], [12], signed64(BIG)),
                         ("stored", [7, 8], [2], [13], 10)]
    assert signed64(BIG) == -5


def test_image_pages_and_their_descendants_are_not_published_and_removals_name_only_published_pages():
    rec = Recorder()
    pub = KVPublisher(rec, page_size=2)
    pub.apply([{"type": "stored", "page_size": 2, "pages": [page(1, None, [1, 2]), page(2, 1, [18, 19], extra=True),
                                                             page(3, 2, [5, 6])]},
               {"type": "stored", "page_size": 2, "pages": [page(4, 3, [7, 8])]},
               {"type": "removed", "hashes": [3, 1]}])
    assert rec.calls == [("stored", [1, 2], [2], [1], None), ("removed", [1])]
    rec.calls.clear()
    pub.apply([{"type": "stored", "page_size": 2, "pages": [page(5, None, [3, 3]), page(6, 5, [4, 4])]},
               {"type": "cleared"}])
    assert rec.calls == [("stored", [3, 3, 4, 4], [2, 2], [5, 6], None), ("removed", [5, 6])]


def test_a_late_subscriber_gets_the_index_parents_first_without_unreachable_pages():
    mirror = kv_events.IndexMirror()
    for event in ([{"type": "stored", "page_size": 4, "pages": [page(1, None, [1] * 4), page(2, 1, [2] * 4)]},
                   {"type": "stored", "page_size": 4, "pages": [page(3, 2, [3] * 4)]},
                   {"type": "stored", "page_size": 4, "pages": [page(7, None, [7] * 4), page(8, 7, [8] * 4)]},
                   {"type": "removed", "hashes": [2]},  # 3 now hangs below an evicted page: unreachable
                   {"type": "stored", "page_size": 4, "pages": [page(9, 8, [9] * 4)]},
                   {"type": "removed", "hashes": [7]},
                   {"type": "stored", "page_size": 4, "pages": [page(7, None, [7] * 4)]}]):  # 7 again, after 8 and 9
        mirror.apply(event)
    snapshot = kv_events.decode(kv_events.encode(mirror.snapshot()))
    assert snapshot[0] == {"type": "cleared"}
    assert [p["hash"] for p in snapshot[1]["pages"]] == [1, 7, 8, 9]
    rec = Recorder()
    KVPublisher(rec, page_size=4).apply(snapshot)
    assert rec.calls == [("stored", [1] * 4, [4], [1], None), ("stored", [7] * 4 + [8] * 4 + [9] * 4, [4, 4, 4],
                                                                [7, 8, 9], None)]
    mirror.apply({"type": "cleared"})
    assert mirror.snapshot() == [{"type": "cleared"}]


from nld_trt.kv.events import CacheCleared, ExtraKey, PagesRemoved, PagesStored, StoredPage


class EventSink:
    def __init__(self) -> None:
        self.got: list[list[dict]] = []
        self.gone = False
        self.closed = False

    def send_events(self, text: str) -> bool:
        self.got.append(kv_events.decode(text))
        return True

    def cancelled(self) -> bool:
        return self.gone

    def close(self) -> None:
        self.closed = True


def run(deliveries) -> None:
    for deliver in deliveries:
        deliver()


def test_the_model_side_hub_sends_a_snapshot_then_the_changes_to_each_subscriber():
    hub = kv_events.Hub()
    hub.on_event(PagesStored((StoredPage(1, None, (1, 2)), StoredPage(2, 1, (3, 4))), 2))
    run(hub.flush())  # nobody listens yet: the events only shape the index
    first = EventSink()
    run(hub.subscribe(first))
    assert first.got == [[{"type": "cleared"}, {"type": "stored", "page_size": 2, "pages": [
        {"hash": 1, "parent": None, "tokens": [1, 2], "extra": False},
        {"hash": 2, "parent": 1, "tokens": [3, 4], "extra": False}]}]]
    hub.on_event(PagesStored((StoredPage(3, 2, (5, 6), extra_keys=(ExtraKey(0, 4, b"image"),)),), 2))
    hub.on_event(PagesRemoved((1,)))
    second = EventSink()
    run(hub.subscribe(second))  # the first gets what was pending, the second the index as it is now
    assert first.got[1] == [{"type": "stored", "page_size": 2, "pages": [
        {"hash": 3, "parent": 2, "tokens": [5, 6], "extra": True}]}, {"type": "removed", "hashes": [1]}]
    assert second.got == [[{"type": "cleared"}]]  # page 1 is gone, so 2 and 3 are unreachable
    first.gone = True
    hub.watch()
    hub.on_event(CacheCleared())
    run(hub.flush())
    assert first.closed and len(first.got) == 2 and second.got[-1] == [{"type": "cleared"}]
    hub.close_all()
    assert second.closed and hub.subscribers == []


def test_the_scheduler_streams_the_page_managers_own_events(tiny_vlm):
    """Through the serving scheduler (no Triton): a subscriber's index, built from the events alone, is the page
    manager's prefix index after a text and an image request, the image's pages marked as keyed by more than
    token ids; a model with its prefix cache off, or a deployment that does not publish its events, refuses the
    subscription, naming the reason."""
    from nld_trt.serving.backend import Scheduler
    from nld_trt.serving.protocol import gather, prepare
    from test_image_worker import LIMITS, image_request
    from test_serving_protocol import ListSink

    sink = EventSink()
    scheduler = Scheduler(tiny_vlm, image_workers=1)
    try:
        scheduler.subscribe_kv_events(sink)
        replies = [ListSink(), ListSink()]
        scheduler.submit(image_request(tiny_vlm, max_tokens=12), replies[0])
        scheduler.submit(prepare(tiny_vlm, gather({}, {"text_input": "A plain question, long enough to fill a page "
                                                       "or two of the cache.", "max_tokens": 12}), LIMITS), replies[1])
        assert all(r.done.wait(60) and not r.errors for r in replies)
    finally:
        scheduler.stop()
    mirror = kv_events.IndexMirror()
    for events in sink.got:
        for event in events:
            mirror.apply(event)
    assert sink.got[0] == [{"type": "cleared"}] and sink.closed
    assert set(mirror.pages) == set(tiny_vlm.pages.index) and len(mirror.pages) >= 4
    assert {page["extra"] for page in mirror.pages.values()} == {True, False}
    assert tiny_vlm.pages.on_event is None  # the stopped scheduler's hub no longer listens

    off = load(tiny_vlm.path, max_batch=2, max_seq_len=256, prefix_cache=False)
    scheduler = Scheduler(off, image_workers=0)
    try:
        with pytest.raises(NLDError, match="no prefix cache"):
            scheduler.subscribe_kv_events(EventSink())
    finally:
        scheduler.stop()
    # a deployment packaged with --no-kv-events keeps its prefix cache but publishes nothing
    scheduler = Scheduler(tiny_vlm, image_workers=0, publish_kv_events=False)
    try:
        assert tiny_vlm.pages.prefix_cache and tiny_vlm.pages.on_event is None
        with pytest.raises(NLDError, match="does not publish KV events .packaged with --no-kv-events"):
            scheduler.subscribe_kv_events(EventSink())
    finally:
        scheduler.stop()
