"""A real tritonserver answering requests shaped exactly as TensorRT-LLM's own Triton clients send them
(its end_to_end_grpc_client.py tensors, `--bad-words` included, its documented `generate` bodies, its
tensorrt_llm model's `bad_words_list`), the sampling controls over the wire, the served models' input types,
and a bad request racing good ones."""

from __future__ import annotations

import json
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nld_trt.errors import NLDError
from nld_trt.serving.client import ClientError, GrpcClient, http_generate, http_generate_stream
from nld_trt.serving.package import ServingOptions, package_repository
from nld_trt.serving.server import TritonServer, find_tritonserver
from nld_trt.serving.stubenv import stub_site

try:
    find_tritonserver()
    stub_site()
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype
except (NLDError, ImportError) as e:  # pragma: no cover - the install step provides them
    pytest.skip(f"no Triton server here ({e})", allow_module_level=True)

PROMPT = "Tom has 12 apples."


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    options = ServingOptions(max_batch=8, max_seq_len=512, max_tokens_cap=200, torch_threads=1)
    repo = package_repository(tiny_dir, tmp_path_factory.mktemp("trtllm") / "repo", options)
    with TritonServer(repo) as s:
        yield s
        code = s.stop()
        assert code == 0, "the server did not stop cleanly:\n" + s.tail(60)


def trtllm_inputs(prompt: str, output_len: int, streaming: bool, **extra) -> dict[str, np.ndarray]:
    """The tensors TensorRT-LLM's end_to_end_grpc_client.py prepare_inputs() builds (its defaults)."""
    inputs = {
        "text_input": np.array([[prompt]]).astype(object),
        "max_tokens": np.ones((1, 1), dtype=np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32) * 0,
        "num_return_sequences": np.array([[1]], dtype=np.int32),
        "exclude_input_in_output": np.array([[False]], dtype=bool),
    }
    inputs.update(extra)
    return inputs


def stream_infer(url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list:
    """start_stream / async_stream_infer / stop_stream, as the TensorRT-LLM client does; the results."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    tensors = []
    for name, array in inputs.items():
        t = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        tensors.append(t)
    client.start_stream(callback=lambda result, error: got.put(error or result))
    client.async_stream_infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                              request_id="1")
    client.stop_stream()  # waits for the stream to close
    client.close()
    return [got.get_nowait() for _ in range(got.qsize())]


@pytest.mark.parametrize("streaming", [False, True])
def test_tensorrt_llms_grpc_client_request_works_unchanged(tiny, server, streaming):
    results = stream_infer(server.grpc_url, "nld", trtllm_inputs(PROMPT, 12, streaming), ["text_output"])
    assert results and not any(isinstance(r, InferenceServerException) for r in results), results
    # the client reads output[0].decode("utf-8")
    text = "".join(r.as_numpy("text_output")[0].decode("utf-8") for r in results if r.as_numpy("text_output") is not None)
    want = tiny.generate(PROMPT, max_new_tokens=12)
    # exclude_input_in_output=false: a unary answer starts with the prompt, as TensorRT-LLM's does
    assert text == (want.text if streaming else tiny.tokenizer.decode(want.prompt_token_ids) + want.text)


def test_tensorrt_llms_log_probs_outputs(tiny, server):
    inputs = trtllm_inputs(PROMPT, 8, False, return_log_probs=np.array([[True]], dtype=bool),
                           exclude_input_in_output=np.array([[True]], dtype=bool))
    result, = stream_infer(server.grpc_url, "nld", inputs, ["text_output", "cum_log_probs", "output_log_probs"])
    want = tiny.generate(PROMPT, max_new_tokens=8, logprobs=True)
    assert result.as_numpy("output_log_probs").shape == (1, 1, 8)
    assert result.as_numpy("output_log_probs")[0, 0].tolist() == pytest.approx([lp.logprob for lp in want.logprobs],
                                                                             abs=1e-4)
    assert float(result.as_numpy("cum_log_probs")[0, 0]) == pytest.approx(sum(lp.logprob for lp in want.logprobs),
                                                                         abs=1e-3)


def test_tensorrt_llms_documented_generate_bodies(tiny, server):
    want = tiny.generate("What is machine learning?", max_new_tokens=20)
    body = {"text_input": "What is machine learning?", "max_tokens": 20, "bad_words": "", "stop_words": "",
            "pad_id": 2, "end_id": 2, "exclude_input_in_output": True}
    assert http_generate(server.http_url, **body).text == want.text
    streamed = list(http_generate_stream(server.http_url, **{**body, "stream": True}))
    assert "".join(c.text for c in streamed) == want.text


@pytest.mark.parametrize("body, message", [
    ({"beam_width": 2}, "beam_width is not supported by nld-trt: got 2, only 1 is accepted"),
    ({"embedding_bias_words": ["apples"]}, "embedding_bias_words is not supported by nld-trt"),
    ({"max_token": 8}, "unknown request parameter 'max_token': the known ones are"),
    ({"top_p": 1.5}, "top_p must be a number in [0, 1], got 1.5"),
    ({"stop_token_ids": [999999]}, "stop_token_ids must be a token id in [0, 512)"),
])
def test_refused_inputs_name_themselves(server, body, message):
    with pytest.raises(ClientError) as e:
        http_generate(server.http_url, text_input=PROMPT, max_tokens=4, **body)
    assert message in str(e.value)


def test_a_bad_seed_racing_good_requests_fails_alone(tiny, server):
    grpc = GrpcClient(server.grpc_url, timeout=120)
    want = tiny.generate(PROMPT, mode="linear_spec", max_new_tokens=60, block_length=4)

    def good():
        return grpc.generate(text_input=PROMPT, mode="linear_spec", max_tokens=60, block_length=4).token_ids

    def bad():
        with pytest.raises(ClientError) as e:
            grpc.infer(text_input=PROMPT, max_tokens=8, parameters={"seed": 1e30, "temperature": 0.5})
        return str(e.value)

    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good) for _ in range(4)]
        bads = [pool.submit(bad) for _ in range(4)]
        assert all(f.result() == want.token_ids for f in goods)
        assert all("seed must be an integer in [0, 18446744073709551615]" in f.result() for f in bads)
    assert grpc.infer(text_input=PROMPT, max_tokens=3).stats["tokens"] == 3


@pytest.mark.parametrize("mode", ["dlm", "linear_spec"])
def test_stop_words_over_the_wire_streamed_equals_unary(tiny, server, mode):
    free = tiny.generate(PROMPT, mode=mode, max_new_tokens=40, block_length=8)
    stop = next(free.text[i : i + 4] for i in range(8, len(free.text) - 4)
                if free.text.find(free.text[i : i + 4]) == i and free.text[i : i + 4].strip())
    grpc = GrpcClient(server.grpc_url, timeout=120)
    kw = dict(text_input=PROMPT, mode=mode, max_tokens=40, block_length=8, stop_words=[stop])
    unary, streamed = grpc.infer(**kw), grpc.generate(**kw)
    assert unary.text == streamed.text == free.text[: free.text.find(stop)]
    assert unary.finish_reason == streamed.finish_reason == "stop"
    assert all(stop not in c.text for c in streamed.chunks)


def test_several_sequences_stream_with_their_index(tiny, server):
    inputs = {"text_input": np.array([[PROMPT]], dtype=object), "max_tokens": np.array([[6]], dtype=np.int32),
              "stream": np.array([[True]], dtype=bool), "num_return_sequences": np.array([[3]], dtype=np.int32),
              "temperature": np.array([[1.0]], dtype=np.float32), "seed": np.array([[9]], dtype=np.uint64)}
    results = stream_infer(server.grpc_url, "nld", inputs, ["text_output", "output_ids", "sequence_index"])
    ids = {i: [] for i in range(3)}
    for r in results:
        if r.as_numpy("output_ids") is not None:
            ids[int(r.as_numpy("sequence_index")[0, 0])] += r.as_numpy("output_ids")[0].tolist()
    want = tiny.generate([PROMPT] * 3, max_new_tokens=6, temperature=1.0, seed=9)
    assert [ids[i] for i in range(3)] == [r.token_ids for r in want]


def test_logprobs_json_names_tokens_and_bytes(tiny, server):
    grpc = GrpcClient(server.grpc_url, timeout=120)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    from nld_trt.serving.client import grpc_inputs

    result = client.infer("nld_sync", grpc_inputs(dict(text_input=PROMPT, max_tokens=4, return_log_probs=True,
                                                       top_logprobs=2)))
    entries = json.loads(result.as_numpy("logprobs")[0, 0])
    want = tiny.generate(PROMPT, max_new_tokens=4, logprobs=True, top_logprobs=2)
    assert [e["token_id"] for e in entries] == want.token_ids
    assert all(len(e["top_logprobs"]) == 2 and bytes(e["bytes"]) == tiny.tokenizer.token_bytes(e["token_id"])
               for e in entries)
    assert grpc.infer(text_input=PROMPT, max_tokens=2).stats["tokens"] == 2


def test_a_client_that_keeps_its_streams_reuses_them_and_cancels_one_request_alone(tiny, server):
    want = tiny.generate(PROMPT, mode="linear_spec", max_new_tokens=30, block_length=4)
    with GrpcClient(server.grpc_url, timeout=120, keep_streams=True) as grpc:
        first = grpc.generate(text_input=PROMPT, mode="linear_spec", max_tokens=30, block_length=4)
        conn = grpc._idle.get_nowait()
        assert conn.streaming  # kept open for the next request
        grpc._idle.put(conn)
        stream = grpc.stream(text_input=PROMPT, mode="linear_spec", max_tokens=150, block_length=4)
        next(stream)
        stream.close()  # stops early: its stream is cancelled
        again = grpc.generate(text_input=PROMPT, mode="linear_spec", max_tokens=30, block_length=4)
    assert first.token_ids == again.token_ids == want.token_ids
    # the module's server fixture then checks that the server stops cleanly


def word_in(tiny, ids: list[int]) -> str:
    """A word the output holds, as text that encodes back to its own tokens (two tokens if possible)."""
    for n in (2, 1):
        for i in range(len(ids) - n + 1):
            text = tiny.tokenizer.decode(ids[i : i + n])
            if text.strip() and "\ufffd" not in text and tiny.tokenizer.encode(text, add_special_tokens=False) == ids[i : i + n]:
                return text
    raise AssertionError(f"no re-encodable word in {ids}")


def banned(tiny, ids: list[int], word: str) -> bool:
    """Whether the token ids contain the word's tokens (as TensorRT-LLM encodes a bad word)."""
    w = tiny.tokenizer.encode(word, add_special_tokens=False)
    return any(ids[i : i + len(w)] == w for i in range(len(ids) - len(w) + 1))


@pytest.mark.parametrize("streaming", [False, True])
def test_tensorrt_llms_grpc_client_bad_words_request_works_unchanged(tiny, server, streaming):
    """end_to_end_grpc_client.py --bad-words W...: a [1, N] BYTES tensor of the words."""
    free = tiny.generate(PROMPT, max_new_tokens=16)
    words = [word_in(tiny, free.token_ids), "apples"]
    assert banned(tiny, free.token_ids, words[0])
    inputs = trtllm_inputs(PROMPT, 16, streaming, bad_words=np.array([words], dtype=object),
                           exclude_input_in_output=np.array([[True]], dtype=bool))
    results = stream_infer(server.grpc_url, "nld", inputs, ["text_output"])
    assert results and not any(isinstance(r, InferenceServerException) for r in results), results
    text = "".join(r.as_numpy("text_output")[0].decode("utf-8") for r in results)
    want = tiny.generate(PROMPT, max_new_tokens=16, bad_words=words)
    assert text == want.text and not banned(tiny, want.token_ids, words[0]) and want.token_ids != free.token_ids


def test_tensorrt_llms_documented_bad_words_and_stop_words_body(tiny, server):
    """Its README's `generate` body with bad_words and stop_words lists, the model name changed."""
    body = {"text_input": "What is machine learning?", "max_tokens": 20, "bad_words": ["intelligence", "model"],
            "stop_words": ["focuses", "learn"], "pad_id": 2, "end_id": 2}
    want = tiny.generate("What is machine learning?", max_new_tokens=20, bad_words=["intelligence", "model"],
                         stop=["focuses", "learn"], eos_token_ids=(2,))
    assert http_generate(server.http_url, **body).text == want.text
    free = tiny.generate("What is machine learning?", max_new_tokens=20, eos_token_ids=(2,))
    word = word_in(tiny, free.token_ids)
    assert banned(tiny, free.token_ids, word)
    got = http_generate(server.http_url, **{**body, "bad_words": [word]}, exclude_input_in_output=True)
    assert not banned(tiny, got.token_ids, word) and got.token_ids != free.token_ids[: len(got.token_ids)]


def test_the_tensorrt_llm_models_bad_words_list_form(tiny, server):
    """The [2, N] ids form TensorRT-LLM's preprocessing hands its tensorrt_llm model: ids, then end offsets."""
    free = tiny.generate(PROMPT, max_new_tokens=12)
    a, b = free.token_ids[1:3], free.token_ids[5:6]
    listed = np.array([[a + b, [2, 3, -1]]], dtype=np.int32)  # words a (2 tokens) and b (1 token)
    got = GrpcClient(server.grpc_url).infer(text_input=PROMPT, max_tokens=12, bad_words_list=listed[0].tolist())
    want = tiny.generate(PROMPT, max_new_tokens=12, bad_words=[a, b])
    assert got.token_ids == want.token_ids and got.token_ids != free.token_ids


def test_every_integer_input_is_int32_as_tensorrt_llms_and_seeds_are_uint64(server):
    """The served model's metadata: one integer convention (INT32, TensorRT-LLM's), except what TensorRT-LLM
    itself declares otherwise: UINT64 (seeds, prompt_table_extra_id, lora_task_id), and its multimodal ensemble's
    UINT8 image pixels and INT64 image sizes."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    uint64 = {"seed", "random_seed", "prompt_table_extra_id", "lora_task_id"}
    images = {"image_bytes_input": "UINT8", "image_sizes_input": "INT64"}
    for model in ("nld", "nld_sync", "nld_tokenizer"):
        types = {i["name"]: i["datatype"] for i in client.get_model_metadata(model, as_json=True)["inputs"]}
        integers = {n: t for n, t in types.items() if t.startswith(("INT", "UINT"))}
        assert {n for n, t in integers.items() if t == "UINT64"} == (uint64 if model != "nld_tokenizer" else set())
        assert {n: integers[n] for n in images if n in integers} == (images if model != "nld_tokenizer" else {})
        assert all(t == "INT32" for n, t in integers.items() if n not in uint64 and n not in images), integers
        if model == "nld":  # the ones that were INT64 before, and TensorRT-LLM's own
            assert {"block_length", "steps_per_block", "max_thinking_tokens", "top_logprobs", "stop_token_ids",
                    "input_ids", "prompt_logprobs", "bad_words_list", "max_tokens", "top_k"} <= set(integers)


def test_a_tensor_of_another_integer_type_is_refused_by_triton_itself(server):
    """A client still sending INT64 for block_length gets Triton's own type error; as a request parameter (JSON,
    any integer width) the same value works."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    block = grpcclient.InferInput("block_length", [1, 1], "INT64")
    block.set_data_from_numpy(np.array([[4]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="'block_length' data-type is 'INT64', but model 'nld_sync' expects 'INT32'"):
        client.infer("nld_sync", [text, block])
    ok = client.infer("nld_sync", [text], parameters={"block_length": 4, "mode": "dlm", "max_tokens": 4})
    assert ok.as_numpy("text_output") is not None


def test_the_tokenizer_model_answers_http_generate(tiny, server):
    """The README's curl: `nld_tokenizer` over Triton's HTTP generate (tokenize, detokenize)."""
    import urllib.request

    def generate(body):
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/nld_tokenizer/generate",
                                         data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())

    out = generate({"text_input": PROMPT})
    assert out["token_ids"] == tiny.tokenizer.encode(PROMPT)
    assert json.loads(out["tokenizer_info"])["eos_token"] == tiny.tokenizer.special_token("eos_token")
    assert generate({"input_ids": out["token_ids"]})["text_output"] == tiny.tokenizer.decode(out["token_ids"],
                                                                                          skip_special_tokens=False)
