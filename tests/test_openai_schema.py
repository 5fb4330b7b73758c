"""The OpenAI front end's pure parts, without a server: which fields are accepted, what each request becomes
for the model (with the served model's inputs of today and with the sampling-controls inputs), the tensors
sent for each declared type, and the response objects, checked against the `openai` SDK's own types.

The live behaviour (errors over HTTP, every mode's tokens, disconnects) is in test_openai_api.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from nld_trt.serving.openai.app import Choice, Shape, model_error, usage
from nld_trt.serving.openai.media import MediaError, MediaOptions, check_url
from nld_trt.serving.openai.schema import (ChatRequest, CompletionRequest, RequestError, chat_request, check_images,
                                           completion_requests, parse, parse_tokenize, tokenize_fields)
from nld_trt.serving.openai.triton import ModelError, ModelInfo, Piece, TritonBridge, piece_from

TODAY = {"text_input": "BYTES", "messages": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32",
         "end_id": "INT32", "random_seed": "UINT64", "mode": "BYTES", "block_length": "INT32", "threshold": "FP32",
         "seed": "INT64", "chat": "BOOL"}
SAMPLING = {**TODAY, "seed": "UINT64", "top_k": "INT32", "top_p": "FP32", "min_p": "FP32", "stop_words": "BYTES",
            "stop_token_ids": "INT32", "return_log_probs": "BOOL", "top_logprobs": "INT32",
            "num_return_sequences": "INT32", "input_ids": "INT32", "max_thinking_tokens": "INT32",
            "chat_template_kwargs": "BYTES", "separate_reasoning": "BOOL", "min_tokens": "INT32",
            "steps_per_block": "INT64", "acceptance": "BYTES", "draft": "BYTES", "lora": "BOOL"}
LIMITS = {"max_tokens_cap": "400", "max_block_length": "128", "max_batch": "8", "max_seq_len": "1024"}
MESSAGES = [{"role": "user", "content": "hi"}]


def info(inputs: dict[str, str]) -> ModelInfo:
    return ModelInfo("nld", inputs, LIMITS, batched=True)


def chat(**fields) -> ChatRequest:
    return parse(ChatRequest, json.dumps({"messages": MESSAGES, **fields}).encode())


def completion(**fields) -> CompletionRequest:
    return parse(CompletionRequest, json.dumps(fields).encode())


def test_fields_at_their_default_are_accepted_and_user_is_ignored():
    r = chat(tools=[], tool_choice="none", parallel_tool_calls=True, frequency_penalty=0, presence_penalty=0.0,
             response_format={"type": "text"}, logit_bias={}, store=False, user="alice", safety_identifier="x")
    assert r.messages[0].text() == "hi"
    assert chat_request(r, info(TODAY)).fields == {"messages": json.dumps(MESSAGES)}


@pytest.mark.parametrize("fields, param", [
    (dict(frequency_penalty=False), "frequency_penalty"),  # a bool is not the number 0
    (dict(parallel_tool_calls=False), "parallel_tool_calls"),
    (dict(n=True), "n"),  # strict: true is not 1
    (dict(max_tokens="8"), "max_tokens"),
    (dict(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages.0.name"),
    (dict(stop=list("abcdefghijklmnopq")), "stop"),
])
def test_look_alike_values_are_refused(fields, param):
    with pytest.raises(RequestError) as e:
        chat(**fields)
    assert e.value.param == param and e.value.status == 400


def test_developer_role_and_text_parts_become_plain_messages():
    r = chat(messages=[{"role": "developer", "content": "be brief"},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    sent = json.loads(chat_request(r, info(TODAY)).fields["messages"])
    assert sent == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


def test_openai_and_nld_fields_map_to_the_model_inputs():
    r = chat(max_completion_tokens=32, temperature=0.7, top_p=0.9, seed=5, stop=["\n", "###"], n=2, logprobs=True,
             top_logprobs=3, mode="dlm", block_length=8, threshold=0.8, top_k=20, min_p=0.05, max_thinking_tokens=16,
             stop_token_ids=[7], chat_template_kwargs={"enable_thinking": True})
    fields = chat_request(r, info(SAMPLING)).fields
    assert fields == {
        "max_tokens": 32, "temperature": 0.7, "mode": "dlm", "block_length": 8, "threshold": 0.8, "seed": 5,
        "top_p": 0.9, "top_k": 20, "min_p": 0.05, "stop_words": ["\n", "###"], "stop_token_ids": [7],
        "max_thinking_tokens": 16, "num_return_sequences": 2, "messages": json.dumps(MESSAGES),
        "chat_template_kwargs": '{"enable_thinking": true}', "separate_reasoning": True, "return_log_probs": True,
        "top_logprobs": 3}
    prompts = completion_requests(completion(prompt=[[1, 2], [3]], max_tokens=4, logprobs=0), info(SAMPLING))
    assert [p.fields["input_ids"] for p in prompts] == [[1, 2], [3]]
    assert prompts[0].fields["return_log_probs"] is True and "top_logprobs" not in prompts[0].fields
    raw = completion_requests(completion(prompt=["a", "b"], n=3), info(SAMPLING))
    assert [(p.fields["text_input"], p.fields["chat"], p.sequences) for p in raw] == [("a", False, 3), ("b", False, 3)]


@pytest.mark.parametrize("fields, param, model_input", [
    (dict(top_p=0.5), "top_p", "top_p"),
    (dict(top_k=4), "top_k", "top_k"),
    (dict(min_p=0.1), "min_p", "min_p"),
    (dict(stop="x"), "stop", "stop_words"),
    (dict(n=2), "n", "num_return_sequences"),
    (dict(logprobs=True), "logprobs", "return_log_probs"),
    (dict(max_thinking_tokens=3), "max_thinking_tokens", "max_thinking_tokens"),
    (dict(chat_template_kwargs={"enable_thinking": True}), "chat_template_kwargs", "chat_template_kwargs"),
])
def test_a_model_without_the_input_refuses_the_field_by_name(fields, param, model_input):
    with pytest.raises(RequestError) as e:
        chat_request(chat(**fields), info(TODAY))
    assert e.value.param == param and f"`{model_input}` input" in e.value.message
    defaults = dict(top_p=1.0, top_k=-1, min_p=0, stop=[], n=1, logprobs=False, chat_template_kwargs={})
    if param in defaults:  # the same field at its default value needs nothing from the model
        chat_request(chat(**{param: defaults[param]}), info(TODAY))


def test_the_models_own_fields_pass_through_by_name():
    r = chat(min_tokens=4, steps_per_block=2, acceptance="official", draft="once", lora=False)
    fields = chat_request(r, info(SAMPLING)).fields
    assert {k: fields[k] for k in ("min_tokens", "steps_per_block", "acceptance", "draft", "lora")} == dict(
        min_tokens=4, steps_per_block=2, acceptance="official", draft="once", lora=False)
    with pytest.raises(RequestError) as e:
        chat(draft="twice")
    assert e.value.param == "draft"


def test_token_id_prompts_need_the_models_input_ids():
    with pytest.raises(RequestError, match="`input_ids` input") as e:
        completion_requests(completion(prompt=[1, 2, 3]), info(TODAY))
    assert e.value.param == "prompt"


def test_deployment_limits_name_the_field():
    for fields, param, fragment in ((dict(max_tokens=401), "max_tokens", "cap of 400"),
                                    (dict(max_completion_tokens=401), "max_completion_tokens", "cap of 400"),
                                    (dict(block_length=129), "block_length", "maximum of 128"),
                                    (dict(n=9), "n", "8 KV-cache slots")):
        with pytest.raises(RequestError) as e:
            chat_request(chat(**fields), info(SAMPLING))
        assert e.value.param == param and fragment in e.value.message


def test_sampling_without_a_seed_draws_one_and_greedy_sends_none():
    seeds = {chat_request(chat(temperature=1.0), info(TODAY)).fields["seed"] for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**62 for s in seeds)
    assert "seed" not in chat_request(chat(), info(TODAY)).fields


def test_tensors_take_the_type_the_model_config_declares():
    bridge = TritonBridge("127.0.0.1:1")
    for inputs, seed_type in ((TODAY, "INT64"), (SAMPLING, "UINT64")):
        tensors = {t.name(): t for t in bridge.tensors(info(inputs), {"seed": 5, "messages": "[]", "stream": True})}
        assert tensors["seed"].datatype() == seed_type and tensors["seed"].shape() == [1, 1]
        assert tensors["messages"].datatype() == "BYTES" and tensors["stream"].datatype() == "BOOL"
    lists = {t.name(): t for t in bridge.tensors(info(SAMPLING), {"stop_words": ["a", "bc"], "input_ids": [4, 5, 6]})}
    assert lists["stop_words"].shape() == [1, 2] and lists["input_ids"].shape() == [1, 3]
    assert lists["input_ids"].datatype() == "INT32"


class FakeResult:
    """A tritonclient InferResult made from the protobuf response Triton sends."""

    def __init__(self, **outputs) -> None:
        from tritonclient.grpc import service_pb2
        from tritonclient.utils import serialize_byte_tensor

        self.response = service_pb2.ModelInferResponse()
        for name, (datatype, values) in outputs.items():
            self.response.outputs.add(name=name, datatype=datatype, shape=[1, len(values)])
            if datatype == "BYTES":
                raw = serialize_byte_tensor(np.array([v.encode() for v in values], dtype=np.object_)).item()
            else:
                raw = np.array(values, dtype={"INT32": np.int32, "FP32": np.float32}[datatype]).tobytes()
            self.response.raw_output_contents.append(raw)

    def get_response(self):
        return self.response


def test_pieces_decode_every_output_the_model_sends():
    lp = [{"token_id": 5, "token": "Hi", "bytes": [72, 105], "logprob": -0.1,
           "top_logprobs": [{"token_id": 5, "token": "Hi", "bytes": [72, 105], "logprob": -0.1}]}]
    piece = piece_from(FakeResult(text_output=("BYTES", ["Hi é"]), output_ids=("INT32", [5, 9]),
                                  num_tokens=("INT32", [2]), nfe=("INT32", [1]), tpf=("FP32", [2.0]),
                                  finish_reason=("BYTES", ["stop"]), stats=("BYTES", ['{"tokens": 2}']),
                                  sequence_index=("INT32", [1]), reasoning_output=("BYTES", ["hm"]),
                                  logprobs=("BYTES", [json.dumps(lp)])))
    assert piece == Piece(index=1, text="Hi é", token_ids=[5, 9], num_tokens=2, nfe=1, tpf=2.0, finish_reason="stop",
                          stats={"tokens": 2}, reasoning="hm", logprobs=lp)
    bare = piece_from(FakeResult(text_output=("BYTES", [""]), output_ids=("INT32", [])))
    assert (bare.index, bare.finish_reason, bare.stats, bare.logprobs) == (0, "", None, None)


def _pieces(index: int) -> list[Piece]:
    entry = lambda t, p: {"token_id": 1, "token": t, "bytes": list(t.encode()), "logprob": p,
                          "top_logprobs": [{"token_id": 1, "token": t, "bytes": list(t.encode()), "logprob": p},
                                           {"token_id": 2, "token": "x", "bytes": [120], "logprob": -3.0}]}
    return [Piece(index, "The", [1], 1, 2, 0.5, reasoning="think", logprobs=[entry("The", -0.2)]),
            Piece(index, " end", [2], 2, 3, 0.67, finish_reason="eos", logprobs=[entry(" end", -0.1)],
                  stats={"tokens": 2, "nfe": 3, "prompt_tokens": 7})]


def test_answers_and_chunks_have_openais_exact_shape():
    for chat_shape in (True, False):
        shape = Shape(chat_shape, "nld", n=2, top_logprobs=2, logprobs=True)
        choices = [Choice(0), Choice(1)]
        chunks = []
        for i in (0, 1):
            for piece in _pieces(i):
                choices[i].add(piece)
                chunks.append(shape.chunk(choices[i], piece, 0))
            chunks.append(shape.chunk(choices[i], None, 7))
        answer = shape.answer(choices)
        assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11, "nfe": 6,
                                   "tpf": 0.6667}
        if chat_shape:
            parsed = ChatCompletion.model_validate(answer)
            assert parsed.choices[1].message.content == "The end" and parsed.choices[1].finish_reason == "stop"
            assert answer["choices"][0]["message"]["reasoning_content"] == "think"
            assert [t.logprob for t in parsed.choices[0].logprobs.content] == [-0.2, -0.1]
            assert len(parsed.choices[0].logprobs.content[0].top_logprobs) == 2
            assert all(ChatCompletionChunk.model_validate(c) for c in chunks + [shape.role_chunk(1)])
            assert chunks[0]["choices"][0]["delta"] == {"reasoning_content": "think", "content": "The"}
            assert chunks[2]["choices"][0]["delta"] == {} and chunks[2]["choices"][0]["finish_reason"] == "stop"
        else:
            parsed = Completion.model_validate(answer)
            assert [c.text for c in parsed.choices] == ["The end", "The end"]
            lp = parsed.choices[0].logprobs
            assert lp.tokens == ["The", " end"] and lp.text_offset == [0, 3] and lp.top_logprobs[0] == {"The": -0.2,
                                                                                                       "x": -3.0}
            # the SDK's Completion type wants a finish_reason (streamed chunks carry null until the last, as OpenAI's)
            assert all(Completion.model_validate(c) for c in chunks if c["choices"][0]["finish_reason"])
            assert chunks[1]["choices"][0]["logprobs"]["text_offset"] == [0]  # offsets of that chunk's tokens


def test_usage_counts_each_prompt_once_and_sums_sequences():
    choices = [Choice(i, tokens=t, nfe=f, prompt_tokens=p) for i, (t, f, p) in enumerate(
        [(10, 2, 5), (12, 3, 5), (4, 4, 9), (6, 2, 9)])]
    assert usage(choices, n=2) == {"prompt_tokens": 14, "completion_tokens": 32, "total_tokens": 46, "nfe": 11,
                                   "tpf": round(32 / 11, 4)}


@pytest.mark.parametrize("message, chat_endpoint, status, param", [
    ("max_tokens must be a positive integer, got 0", True, 400, "max_tokens"),
    ("unknown mode 'x': choose one of ar, dlm, linear_spec", True, 400, "mode"),
    ("the prompt (900 tokens) + max_tokens (200) needs 1100 KV-cache positions", True, 400, "messages"),
    ("the prompt (900 tokens) + max_tokens (200) needs 1100 KV-cache positions", False, 400, "prompt"),
    ("stop_words must be strings", False, 400, "stop"),
    ("internal error in the decoding loop (RuntimeError: x): retry the request", True, 500, None),
    ("the model is being unloaded", True, 503, None),
    ("messages[2].content[1]: the image is truncated or corrupted (OSError: x)", True, 400, "messages[2].content[1]"),
])
def test_model_errors_become_openai_errors(message, chat_endpoint, status, param):
    e = model_error(ModelError(message), chat_endpoint)
    assert (e.status, e.param, e.message) == (status, param, message)


# images ---------------------------------------------------------------------------------------------------
PNG = "data:image/png;base64,iVBORw0KGgo="
VLM = {**LIMITS, "images": "true", "max_images_per_request": "2", "max_image_bytes": "1024"}


def image(url: str = PNG, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def test_image_parts_reach_the_model_in_place_and_text_only_messages_stay_strings():
    r = chat(messages=[{"role": "system", "content": "be brief"},
                       {"role": "user", "content": [{"type": "text", "text": "Compare"}, image(detail="low"),
                                                    {"type": "image_url", "image_url": PNG}]}])
    sent = json.loads(chat_request(r, ModelInfo("nld", TODAY, VLM, batched=True)).fields["messages"])
    assert sent == [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "Compare"}, image(), image()]}]


@pytest.mark.parametrize("messages, param, fragment", [
    ([{"role": "user", "content": [image(detail="ultra")]}], "messages[0].content[0]", "detail must be auto, low or high"),
    ([{"role": "user", "content": ["hi", image()]}], "messages[0].content[0]", "a content part must be an object"),
    ([{"role": "assistant", "content": [image()]}], "messages[0].content[0]", "images go in user messages only"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG, "size": 3}}]}],
     "messages[0].content[0]", "unknown field 'image_url.size'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]", "needs"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}], "messages[0].content[0]",
     "'video_url' are not supported"),
])
def test_bad_image_parts_are_named_as_the_model_names_them(messages, param, fragment):
    with pytest.raises(RequestError) as e:
        chat(messages=messages)
    assert e.value.param == param and (fragment is None or fragment in e.value.message), e.value.message


def test_what_the_served_model_cannot_take_is_refused_before_anything_is_sent():
    two = chat(messages=[{"role": "user", "content": [image(), {"type": "text", "text": "x"}, image(), image()]}])
    with pytest.raises(RequestError, match="more than 2 images") as e:
        check_images(two, ModelInfo("nld", TODAY, VLM, batched=True))
    assert e.value.param == "messages[0].content[3]"
    large = chat(messages=[{"role": "user", "content": [image(PNG + "A" * 2000)]}])
    with pytest.raises(RequestError, match="over this deployment's limit of 1024 bytes"):
        check_images(large, ModelInfo("nld", TODAY, VLM, batched=True))
    text_model = ModelInfo("nld", TODAY, {**LIMITS, "images": "the served model is a text-only model: ..."}, True)
    with pytest.raises(RequestError, match="text-only model") as e:
        chat_request(chat(messages=[{"role": "user", "content": [image()]}]), text_model)
    assert e.value.param == "messages[0].content[0]"
    check_images(large, ModelInfo("nld", TODAY, LIMITS, batched=True))  # an older repository says nothing: the model decides
    with pytest.raises(RequestError, match="only data URLs reach the model"):  # an http URL nobody fetched
        chat_request(chat(messages=[{"role": "user", "content": [image("http://example.com/a.png")]}]),
                     ModelInfo("nld", TODAY, VLM, batched=True))


def test_tokenize_refuses_image_parts_by_name():
    req = parse_tokenize(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                               image()]}]}).encode())
    with pytest.raises(RequestError, match="counts text only") as e:
        tokenize_fields(req)
    assert e.value.param == "messages[0].content[1]"


@pytest.mark.parametrize("url, hosts, outcome", [
    (PNG, (), "data"),
    ("https://images.example.com/a.png", ("images.example.com",), "http"),
    ("http://IMAGES.example.com:8080/a.png", ("images.example.com",), "http"),
    ("https://images.example.com/a.png", (), "started without --allowed-media-domains"),
    ("https://images.example.com.evil.org/a.png", ("images.example.com",), "'images.example.com.evil.org' is not one"),
    ("file:///etc/passwd", ("images.example.com",), "never reads local files"),
    ("ftp://images.example.com/a.png", ("images.example.com",), "got ftp:"),
    ("/etc/passwd", (), "got '/etc/passwd'"),
])
def test_which_image_urls_are_taken_fetched_or_refused(url, hosts, outcome):
    options = MediaOptions(allowed_domains=hosts)
    if outcome in ("data", "http"):
        assert check_url(url, "messages[0].content[0]", options) == outcome
    else:
        with pytest.raises(MediaError, match=outcome.replace("(", r"\(")) as e:
            check_url(url, "messages[0].content[0]", options)
        assert e.value.param == "messages[0].content[0]"
