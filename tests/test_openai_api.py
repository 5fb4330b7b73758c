"""The OpenAI-compatible API, called with the real `openai` SDK, in front of a real tritonserver serving the
embedded model (`nld-trt serve`, one deployment for this module).

Every endpoint, unary and streaming, in every mode, must give the tokens of in-process greedy generation;
usage must carry the model's counts; bad requests get OpenAI-shaped errors naming the field while the
server keeps serving; 32 concurrent streams get their own answers; a client that leaves frees its KV slot.
Features that wait for model inputs the served model does not have yet (stop strings, n > 1, logprobs,
token-id prompts, reasoning) skip at run time, naming the missing input, read from the model's config.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
from openai_stack import CAP, ENDLESS, SLOTS, package_embedded, require_stack, start_stack

require_stack()

import openai  # noqa: E402

import nld_trt  # noqa: E402
from nld_trt.evaluate import load_task  # noqa: E402
from nld_trt.serving.client import GrpcClient  # noqa: E402
from nld_trt.serving.openai.media import MAX_BODY_BYTES  # noqa: E402

MODES = ("ar", "dlm", "linear_spec")
QUESTIONS = [p.question for p in load_task("gsm_synth")[:4]]
RAW = ["Tom has 12 apples. He gives 5 to Sam.", "A pack holds 6 pens.", "Mia has"]
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwADAgH/"
         "p0Ql/QAAAABJRU5ErkJggg==")  # a 1 x 1 PNG
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai-api")
    s = start_stack(package_embedded(directory), directory)
    yield s
    code = s.stop()
    assert code == 0, s.log.read_text()[-3000:]
    assert "tritonserver stopped" in s.log.read_text()


@pytest.fixture(scope="module")
def nld():
    return nld_trt.load(max_batch=4, max_seq_len=1024)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def inputs(stack):
    return stack.model_inputs()


def needs(inputs: set[str], *names: str) -> None:
    missing = [n for n in names if n not in inputs]
    if missing:
        pytest.skip(f"waiting for the served model's {', '.join(missing)} input(s) (sampling-controls change in the "
                    "model): the front end sends them once the model has them")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_usage(u, want) -> None:
    assert (u.prompt_tokens, u.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.nfe == want.stats.nfe and u.tpf == pytest.approx(want.stats.tpf, abs=1e-3)


def probe(stack) -> dict:
    """Stats of a one-token request straight to Triton: KV slots in use and cancellations so far."""
    return GrpcClient(stack.grpc_url, timeout=60).generate(text_input="hi", max_tokens=1).stats


# --------------------------------------------------------------------------------------------------------
def test_models_health_and_the_chat_page(stack, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["nld"] and models[0].owned_by == "nld-trt" and models[0].max_model_len == 1024
    health = httpx.get(f"{stack.base_url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "nld"}
    page = httpx.get(f"{stack.base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "nld-trt chat" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?https?:|@import""", page.text)  # offline


def test_mode_auto_gives_the_ar_tokens(nld, client):
    want = nld.generate(QUESTIONS[1], mode="ar", max_new_tokens=64)
    for extra in ({"mode": "auto"}, {"mode": "auto", "block_length": 16}):
        r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[1]), max_tokens=64, extra_body=extra)
        assert r.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match="allow_lossy is for mode auto"):
        client.chat.completions.create(model="nld", messages=user(QUESTIONS[1]), max_tokens=8,
                                       extra_body={"mode": "ar", "allow_lossy": True})


@pytest.mark.parametrize("mode", MODES)
def test_chat_unary_and_streaming_give_the_in_process_tokens(nld, client, mode):
    want = nld.generate(QUESTIONS[0], mode=mode, max_new_tokens=64)
    r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_completion_tokens=64,
                                       extra_body={"mode": mode})
    assert r.object == "chat.completion" and r.model == "nld" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == FINISH[want.finish_reason] and choice.index == 0
    check_usage(r.usage, want)

    chunks = list(client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=64,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"mode": mode}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    deltas = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(deltas) > 1 and all(deltas) and "".join(deltas) == want.text  # streamed as decoded, in pieces
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == FINISH[want.finish_reason]
    streamed, unary = chunks[-1].usage.model_dump(), r.usage.model_dump()
    # the second request reuses the first one's prompt pages: all of them but the page of its last token
    assert streamed.pop("prompt_tokens_details")["cached_tokens"] == (r.usage.prompt_tokens - 1) // 16 * 16 > 0
    unary.pop("prompt_tokens_details")
    assert chunks[-1].choices == [] and streamed == unary


@pytest.mark.parametrize("mode", MODES)
def test_completions_unary_and_streaming_give_the_in_process_tokens(nld, client, stack, mode):
    want = nld.generate(RAW[0], chat=False, mode=mode, max_new_tokens=32, block_length=8)
    extra = {"mode": mode, "block_length": 8}
    r = client.completions.create(model="nld", prompt=RAW[0], max_tokens=32, extra_body=extra)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == FINISH[want.finish_reason]
    check_usage(r.usage, want)

    body = {"model": "nld", "prompt": RAW[0], "max_tokens": 32, "stream": True, **extra}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": FINISH[want.finish_reason]}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completions_with_a_list_of_prompts_answer_each_in_order(nld, client):
    want = [nld.generate(p, chat=False, mode="linear_spec", max_new_tokens=24) for p in RAW]
    r = client.completions.create(model="nld", prompt=RAW, max_tokens=24, extra_body={"mode": "linear_spec"})
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == [w.text for w in want]
    assert r.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert r.usage.nfe == sum(w.stats.nfe for w in want)

    texts = ["", "", ""]
    finishes = [None, None, None]
    for chunk in client.completions.create(model="nld", prompt=RAW, max_tokens=24, stream=True,
                                           extra_body={"mode": "linear_spec"}):
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = finishes[c.index] or c.finish_reason
    assert texts == [w.text for w in want] and finishes == [FINISH[w.finish_reason] for w in want]


def test_nld_fields_as_extra_body_reach_the_model(nld, client):
    cases = [dict(mode="dlm", block_length=8, threshold=0.5), dict(mode="linear_spec", block_length=16, threshold=0.3),
             dict(mode="ar", temperature=0.8, seed=11), dict(mode="dlm", block_length=4, temperature=0.7, seed=3),
             dict(mode="ar", min_tokens=45), dict(mode="dlm", steps_per_block=2, block_length=8),
             dict(mode="linear_spec", threshold=0.5, draft="once", lora=False)]
    for case in cases:
        want = nld.generate(QUESTIONS[1], max_new_tokens=48, **case)
        extra = {k: v for k, v in case.items() if k not in ("temperature", "seed")}
        r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[1]), max_tokens=48,
                                           temperature=case.get("temperature"), seed=case.get("seed"),
                                           extra_body=extra)
        assert r.choices[0].message.content == want.text, case
        assert r.usage.nfe == want.stats.nfe, case


def test_sampling_without_a_seed_varies_between_requests(client):
    # OpenAI semantics: no seed, a fresh sample each time (greedy requests are unaffected). min_tokens: the
    # embedded model may end a bare "Mia has" at once (an EOS is a sample too), which would leave nothing to compare
    texts = {client.completions.create(model="nld", prompt="Mia has", max_tokens=24, temperature=1.5,
                                       extra_body={"min_tokens": 8}).choices[0].text
             for _ in range(4)}
    assert len(texts) > 1


def test_top_p_top_k_min_p(nld, client, inputs):
    needs(inputs, "top_p", "top_k", "min_p")
    for case in (dict(top_p=0.5), dict(top_k=3), dict(min_p=0.2)):
        want = nld.generate(QUESTIONS[2], max_new_tokens=32, temperature=1.0, seed=7, **case)
        extra = {k: v for k, v in case.items() if k != "top_p"}
        r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[2]), max_tokens=32, temperature=1.0,
                                           seed=7, top_p=case.get("top_p"), extra_body=extra)
        assert r.choices[0].message.content == want.text, case


def test_n_3_returns_three_sequences_seeded_seed_plus_i(nld, client, inputs):
    needs(inputs, "num_return_sequences")
    greedy = nld.generate(QUESTIONS[0], max_new_tokens=32)
    r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=32, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.message.content for c in r.choices} == {greedy.text}
    assert r.usage.completion_tokens == 3 * len(greedy.token_ids)
    assert r.usage.prompt_tokens == len(greedy.prompt_token_ids)

    sampled = nld.generate([QUESTIONS[0]] * 3, max_new_tokens=32, temperature=1.0, seed=5)
    r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=32, n=3,
                                       temperature=1.0, seed=5)
    assert [c.message.content for c in r.choices] == [s.text for s in sampled]
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=32, n=3,
                                                temperature=1.0, seed=5, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [s.text for s in sampled]


def test_stop_strings_end_the_answer_before_them(nld, client, inputs):
    needs(inputs, "stop_words")
    full = nld.generate(QUESTIONS[0], max_new_tokens=64).text
    stop = " = "
    assert stop in full, full
    want = full[: full.index(stop)]
    for stops in (stop, [" never seen ", stop]):
        r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=64, stop=stops)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=64,
                                                     stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model="nld", prompt=RAW[0], max_tokens=32, stop=["."])
    assert "." not in r.choices[0].text


def test_logprobs(client, inputs):
    needs(inputs, "return_log_probs", "top_logprobs")
    r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=16, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))  # greedy: the top token
    c = client.completions.create(model="nld", prompt=RAW[0], max_tokens=8, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == c.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_token_id_prompts(nld, client, inputs):
    needs(inputs, "input_ids")
    ids = nld.tokenizer.encode(RAW[0])
    want = nld.generate(ids, max_new_tokens=16)
    r = client.completions.create(model="nld", prompt=ids, max_tokens=16)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="nld", prompt=[ids, ids[:3]], max_tokens=16)
    assert r.choices[0].text == want.text and len(r.choices) == 2


def test_reasoning_content_is_separated_from_content(nld, client, inputs):
    needs(inputs, "separate_reasoning", "chat_template_kwargs", "max_thinking_tokens")
    end_think = nld.tokenizer.token_id("[/THINK]")
    want = nld.generate(QUESTIONS[0], max_new_tokens=48, template_kwargs={"enable_thinking": True},
                        max_thinking_tokens=8, end_think_token_id=end_think)
    cut = want.token_ids.index(end_think)
    reasoning = nld.tokenizer.decode(want.token_ids[:cut])
    answer = nld.tokenizer.decode(want.token_ids[cut + 1:])
    extra = {"chat_template_kwargs": {"enable_thinking": True}, "max_thinking_tokens": 8}
    r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=48, extra_body=extra)
    message = r.choices[0].message
    assert message.reasoning_content.strip() == reasoning.strip() and message.content.strip() == answer.strip()
    chunks = list(client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=48,
                                                 stream=True, extra_body=extra))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed.strip() == reasoning.strip()


# errors -----------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
BAD = [
    ("chat", dict(temperature=5), 400, "temperature", "less than or equal to 2"),
    ("chat", dict(extra_body={"temperature": "hot"}), 400, "temperature", "valid number"),
    ("chat", dict(n=0), 400, "n", "greater than or equal to 1"),
    ("chat", dict(max_completion_tokens=0), 400, "max_completion_tokens", "greater than or equal to 1"),
    ("chat", dict(max_completion_tokens=CAP + 1), 400, "max_completion_tokens", f"cap of {CAP}"),
    ("chat", dict(model="gpt-4o"), 404, "model", "'gpt-4o' does not exist"),
    ("chat", dict(extra_body={"mode": "fast"}), 400, "mode", "'ar', 'dlm', 'linear_spec' or 'auto', got \"fast\""),
    ("chat", dict(extra_body={"block_length": 0}), 400, "block_length", "greater than or equal to 1"),
    ("chat", dict(extra_body={"block_length": 4096}), 400, "block_length", "maximum of 128"),
    ("chat", dict(extra_body={"threshold": 1.5}), 400, "threshold", "less than or equal to 1"),
    ("chat", dict(tools=[TOOL]), 400, "tools", "function calling is not supported"),
    ("chat", dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), 400,
     "response_format", "json_schema"),
    ("chat", dict(logit_bias={"5": 10}), 400, "logit_bias", "not supported"),
    ("chat", dict(presence_penalty=0.5), 400, "presence_penalty", "penalties are not supported"),
    ("chat", dict(messages=[]), 400, "messages", "at least 1 item"),
    ("chat", dict(messages=[{"role": "tool", "content": "4", "tool_call_id": "x"}]), 400, "messages.0.role",
     "does no function calling"),
    ("chat", dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]), 400,
     "messages[0].content[0]", "type 'input_audio' are not supported"),
    # the embedded model has no vision tower: its repository says so, and the front end answers before sending
    ("chat", dict(messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                         {"type": "image_url", "image_url": {"url": PIXEL}}]}]), 400,
     "messages[0].content[1]", "is a text-only model: it cannot take images (it has no vision tower"),
    ("chat", dict(extra_body={"frobnicate": 1}), 400, "frobnicate", "unknown field 'frobnicate'"),
    ("chat", dict(top_logprobs=3), 400, "top_logprobs", "needs logprobs=true"),
    ("chat", dict(stream_options={"include_usage": True}), 400, "stream_options", "only allowed with stream=true"),
    ("chat", dict(seed=-1), 400, "seed", "greater than or equal to 0"),
    ("chat", dict(messages=user("hi " * 1200)), 400, "messages", "KV-cache positions"),  # the model's own check
    ("chat", dict(messages=user("hi " * 1200), stream=True), 400, "messages", "KV-cache positions"),
    ("completions", dict(prompt=""), 400, "prompt", "empty"),
    ("completions", dict(prompt=[1, "a"]), 400, "prompt", "must be a string, a list of strings"),
    ("completions", dict(prompt="hi", best_of=3), 400, "best_of", "best_of can only equal n"),
    ("completions", dict(prompt="hi", max_tokens=0), 400, "max_tokens", "max_tokens 0 generates nothing"),
    ("completions", dict(prompt="hi", extra_body={"prompt_logprobs": 21}), 400, "prompt_logprobs", "less than or equal to 20"),
    ("chat", dict(extra_body={"bad_words": "apples"}), 400, "bad_words", "valid list"),
    ("completions", dict(prompt="hi", extra_body={"chat_template_kwargs": {"enable_thinking": True}}), 400,
     "chat_template_kwargs", "applies to /v1/chat/completions only"),
    ("completions", dict(prompt="hi", stream=True, max_tokens=CAP + 1), 400, "max_tokens", f"cap of {CAP}"),
]


def good_request_answers(client) -> None:
    r = client.chat.completions.create(model="nld", messages=user("hi"), max_tokens=2)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("endpoint, kwargs, status, param, fragment", BAD,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, endpoint, kwargs, status, param,
                                                                      fragment):
    request = {"model": "nld", **({"messages": user("hi")} if endpoint == "chat" else {}), **kwargs}
    call = client.chat.completions.create if endpoint == "chat" else client.completions.create
    with pytest.raises(openai.APIStatusError) as e:
        result = call(**request)
        list(result) if request.get("stream") else None
    error = e.value
    assert error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["param"] == param and fragment in error.body["message"], error.body
    assert error.body["type"] == "invalid_request_error"
    good_request_answers(client)


def _raw(stack, request: bytes) -> tuple[int, dict]:
    """Send raw HTTP bytes; the status and JSON body of the answer (the server may answer before the body ends)."""
    with socket.create_connection(("127.0.0.1", stack.openai_port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
    return int(head.split()[1]), json.loads(body)


def test_malformed_oversized_and_misrouted_requests_get_openai_errors(stack, client):
    url = stack.base_url
    cases = [
        (httpx.post(f"{url}/v1/chat/completions", content=b"{not json"), 400, "not valid JSON"),
        (httpx.post(f"{url}/v1/chat/completions", json=[1, 2]), 400, "must be a JSON object"),
        (httpx.post(f"{url}/v1/embeddings", json={}), 404, "no route POST /v1/embeddings"),
        (httpx.get(f"{url}/v1/chat/completions"), 405, "GET is not allowed"),
    ]
    for response, status, fragment in cases:
        assert response.status_code == status and fragment in response.json()["error"]["message"]
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        good_request_answers(client)
    limit = MAX_BODY_BYTES
    declared = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {limit + 1}\r\n\r\n").encode()
    status, body = _raw(stack, declared)  # refused from the header, before any of the body is read
    assert status == 413 and body["error"]["code"] == "request_too_large" and str(limit) in body["error"]["message"]
    chunk = b'{"messages": "' + b"x" * 65536
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * (limit // len(chunk) + 1))
    status, body = _raw(stack, chunked)  # no length given, no end sent: refused once the cap is passed
    assert status == 413 and body["error"]["code"] == "request_too_large"
    good_request_answers(client)


def test_front_end_without_tritonserver_answers_503():
    from nld_trt.serving.openai.frontend import FrontEnd
    from nld_trt.serving.server import free_port

    with FrontEnd(f"127.0.0.1:{free_port()}", port=0) as front:
        health = httpx.get(f"{front.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["error"]["code"] == "service_unavailable"
        c = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="nld", messages=user("hi"))
        assert e.value.status_code == 503 and "tritonserver at" in e.value.body["message"]
        assert e.value.body["type"] == "server_error"
        assert [m.id for m in c.models.list().data] == ["nld"]  # the listing does not need Triton


# load and disconnects ---------------------------------------------------------------------------------
def test_32_concurrent_streaming_clients_each_get_their_own_answer(nld, stack):
    jobs = [(QUESTIONS[i % 4] if i % 2 == 0 else RAW[i % 3], MODES[i % 3], 16 + (7 * i) % 33) for i in range(32)]
    want = [nld.generate(p, chat=i % 2 == 0, mode=m, max_new_tokens=n).text for i, (p, m, n) in enumerate(jobs)]
    occupancy: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            occupancy.append(stack.metric("nld_kv_slots_in_use") + stack.metric("nld_requests_waiting"))
            time.sleep(0.02)

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        prompt, mode, n = jobs[i]
        if i % 2 == 0:
            stream = await c.chat.completions.create(model="nld", messages=user(prompt), max_tokens=n, stream=True,
                                                     extra_body={"mode": mode})
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        stream = await c.completions.create(model="nld", prompt=prompt, max_tokens=n, stream=True,
                                            extra_body={"mode": mode})
        return "".join([ch.choices[0].text async for ch in stream])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0,
                                      timeout=120, http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64))) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = asyncio.run(run())
    finally:
        stop.set()
        watcher.join()
    for job, g, w in zip(jobs, got, want):
        assert g == w, job
    assert max(occupancy) > SLOTS // 2  # the streams really were decoded together (and some waited)


def _wait_for_cancel(stack, before: int) -> dict:
    deadline = time.monotonic() + 30
    while (stats := probe(stack))["cancelled_total"] != before + 1 or stats["slots_in_use"] != 0:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    return stats


def test_a_client_that_drops_its_stream_frees_its_kv_slot(stack, client):
    before = probe(stack)["cancelled_total"]
    stream = client.completions.create(model="nld", prompt=ENDLESS, max_tokens=CAP, stream=True,
                                       extra_body={"mode": "ar", "min_tokens": CAP})
    chunks = [next(iter(stream)) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in chunks)
    assert stack.metric("nld_kv_slots_in_use") == 1  # the stream holds its slot
    stream.close()  # the client goes away mid-stream
    _wait_for_cancel(stack, before)
    assert stack.metric("nld_kv_slots_in_use") == 0
    good_request_answers(client)


def test_a_unary_client_that_gives_up_frees_its_kv_slot(stack, client):
    before = probe(stack)["cancelled_total"]
    body = {"model": "nld", "prompt": ENDLESS, "max_tokens": CAP, "min_tokens": CAP, "mode": "ar"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=0.3)
    _wait_for_cancel(stack, before)
    assert stack.metric("nld_kv_slots_in_use") == 0
    good_request_answers(client)


def test_serve_refuses_an_openai_port_in_use_before_starting_tritonserver(tmp_path):
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "nld_trt.serving.cli", "serve", str(tmp_path / "no-repo"),
                              "--openai-port", str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "tritonserver" not in out.stderr.split("Error:")[0]
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--openai-port" in out.stderr


# prompt log-probabilities, echo, bad words, the tokenizer endpoints --------------------------------------
def test_echo_with_logprobs_scores_the_prompt_as_the_python_api(nld, client):
    """What lm-eval's loglikelihood requests send: token ids, echo, logprobs 1, max_tokens 1."""
    ids = nld.tokenizer.encode(RAW[0], add_special_tokens=False)
    want = nld.generate(ids, chat=False, max_new_tokens=1, prompt_logprobs=1, logprobs=True, top_logprobs=1)
    r = client.completions.create(model="nld", prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0,
                                  seed=1234)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == nld.tokenizer.decode(ids, skip_special_tokens=False) + want.text
    assert lp.tokens == [nld.tokenizer.token_text(t) for t in ids + want.token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]] +
                                                 [want.logprobs[0].logprob], abs=1e-6)
    assert [v for t in lp.top_logprobs[1:-1] for v in t.values()] == pytest.approx(
        [v for e in want.prompt_logprobs[1:] for _, v in e.top], abs=1e-6)
    assert lp.text_offset[0] == 0 and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


def test_max_tokens_zero_with_echo_scores_only_the_prompt_and_streams_the_same(nld, client):
    want = nld.generate(RAW[1], chat=False, max_new_tokens=0, prompt_logprobs=2)
    r = client.completions.create(model="nld", prompt=RAW[1], max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == RAW[1] and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]], abs=1e-6)
    chunks = list(client.completions.create(model="nld", prompt=RAW[1], max_tokens=0, echo=True, logprobs=2,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == RAW[1]
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == choice.logprobs.token_logprobs


def test_vllms_prompt_logprobs_field(nld, client):
    want = nld.generate(RAW[0], chat=False, max_new_tokens=3, prompt_logprobs=2)
    r = client.completions.create(model="nld", prompt=RAW[0], max_tokens=3, extra_body={"prompt_logprobs": 2})
    got = r.model_dump()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for entry, lp in zip(got[1:], want.prompt_logprobs[1:]):
        assert entry[str(lp.token_id)]["logprob"] == pytest.approx(lp.logprob, abs=1e-6)
        assert entry[str(lp.token_id)]["rank"] == lp.rank
        assert all(str(t) in entry and entry[str(t)]["rank"] <= 2 for t, _ in lp.top)
    assert r.choices[0].text == want.text
    chat = client.chat.completions.create(model="nld", messages=user(QUESTIONS[0]), max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.model_dump()["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_bad_words_never_appear_and_follow_vllms_rule(nld, client):
    free = nld.generate(QUESTIONS[2], max_new_tokens=40)
    word = free.text.split()[1]  # a word of the free answer, banned alone and after a space (vLLM's rule)
    r = client.chat.completions.create(model="nld", messages=user(QUESTIONS[2]), max_tokens=40,
                                       extra_body={"bad_words": [word]})
    want = nld.generate(QUESTIONS[2], max_new_tokens=40, bad_words=[word.lstrip(), " " + word.lstrip()])
    assert r.choices[0].message.content == want.text and want.text != free.text
    for variant in (word.lstrip(), " " + word.lstrip()):
        w = nld.tokenizer.encode(variant, add_special_tokens=False)
        assert not any(want.token_ids[i : i + len(w)] == w for i in range(len(want.token_ids)))


def test_the_tokenizer_endpoints_answer_with_vllms_shapes(nld, stack):
    tok = nld.tokenizer
    r = httpx.post(f"{stack.base_url}/tokenize", json={"model": "nld", "prompt": RAW[0], "add_special_tokens": False,
                                                        "return_token_strs": True}).json()
    ids = tok.encode(RAW[0], add_special_tokens=False)
    assert r == {"count": len(ids), "max_model_len": 1024, "tokens": ids, "token_strs": [tok.token_text(t) for t in ids]}
    chat = httpx.post(f"{stack.base_url}/tokenize", json={"messages": user(QUESTIONS[0])}).json()
    assert chat["tokens"] == nld.encode(QUESTIONS[0]) and chat["token_strs"] is None
    back = httpx.post(f"{stack.base_url}/detokenize", json={"model": "nld", "tokens": ids}).json()
    assert back == {"prompt": tok.decode(ids, skip_special_tokens=False)}
    info = httpx.get(f"{stack.base_url}/tokenizer_info").json()
    assert info["eos_token"] == tok.special_token("eos_token") and info["chat_template"] == tok.chat_template
    bad = httpx.post(f"{stack.base_url}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "input_ids must be token ids" in bad.json()["error"]["message"]
    assert httpx.post(f"{stack.base_url}/tokenize", json={"prompt": 3}).status_code == 400
