"""A real tritonserver (the binary nvidia-pytriton ships) serving a packaged random tiny checkpoint.

Every entry point (HTTP generate, gRPC unary, gRPC stream, HTTP generate_stream) must give exactly the
tokens of in-process generation; concurrent mixed-mode requests must too; bad requests get clear errors
and the server keeps serving; a client that goes away frees its KV slot; `nld-trt serve` refuses a tampered
artifact and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from nld_trt.errors import NLDError
from nld_trt.serving.client import ClientError, GrpcClient, http_generate, http_generate_stream
from nld_trt.serving.package import ServingOptions, package_repository
from nld_trt.serving.server import TritonServer, find_tritonserver, free_port
from nld_trt.serving.stubenv import stub_site

try:
    find_tritonserver()
    stub_site()
    import tritonclient.grpc  # noqa: F401
except (NLDError, ImportError) as e:  # pragma: no cover - the install step provides them
    pytest.skip(f"no Triton server here ({e})", allow_module_level=True)

CAP = 300  # max_tokens cap of the test deployment: long enough for a stream to be cut mid-way
PROMPTS = ["Tom has 12 apples.", "hi", "A pack holds 6 pens. Sara buys 4 packs.", "The quick brown fox"]
MODES = ("ar", "dlm", "linear_spec")


@pytest.fixture(scope="module")
def repo(tiny_dir, tmp_path_factory):
    options = ServingOptions(max_batch=8, max_seq_len=512, max_tokens_cap=CAP, torch_threads=1)
    return package_repository(tiny_dir, tmp_path_factory.mktemp("triton") / "repo", options)


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo) as s:
        yield s
        code = s.stop()
        assert code == 0, "\n".join(l for l in s.lines if "Timeout" not in l)[-6000:]


@pytest.fixture(scope="module")
def grpc(server):
    return GrpcClient(server.grpc_url, timeout=120)


def reference(tiny, prompt, mode, max_tokens, block_length=8):
    return tiny.generate(prompt, mode=mode, max_new_tokens=max_tokens, block_length=block_length)


@pytest.mark.parametrize("mode", MODES)
def test_every_entry_point_gives_the_in_process_tokens(tiny, server, grpc, mode):
    want = reference(tiny, PROMPTS[0], mode, 20)
    request = dict(text_input=PROMPTS[0], mode=mode, max_tokens=20, block_length=8)
    results = {
        "http generate": http_generate(server.http_url, **request),
        "grpc unary": grpc.infer(**request),
        "grpc stream": grpc.generate(**request),
    }
    sse = list(http_generate_stream(server.http_url, **request))
    for name, r in results.items():
        assert r.token_ids == want.token_ids, name
        assert r.text == want.text and r.finish_reason == want.finish_reason, name
        assert (r.stats["tokens"], r.stats["nfe"], r.stats["mode"]) == (want.stats.tokens, want.stats.nfe, mode), name
        assert r.stats["tpf"] == pytest.approx(want.stats.tpf, abs=1e-3)
    stream = results["grpc stream"]
    assert len(stream.chunks) > 1 and all(c.token_ids for c in stream.chunks)  # tokens as they are committed
    # as many responses as steps, unless the sender fell behind and merged some (backend.coalesce)
    assert [t for c in sse for t in c.token_ids] == want.token_ids and 1 < len(sse) <= len(want.token_ids)
    if mode != "ar":  # several tokens per step somewhere (linear_spec may accept one per verify on a random model)
        assert mode == "linear_spec" or max(len(c.token_ids) for c in stream.chunks) > 1


def test_mode_as_a_request_parameter(tiny, grpc):
    want = reference(tiny, PROMPTS[1], "dlm", 12)
    got = grpc.infer(text_input=PROMPTS[1], max_tokens=12, parameters={"mode": "dlm", "block_length": 8})
    assert got.token_ids == want.token_ids and got.stats["mode"] == "dlm"


def test_32_concurrent_mixed_requests_match_their_sequential_results(tiny, server, grpc):
    jobs = [(PROMPTS[i % 4], MODES[i % 3], 6 + (7 * i) % 19, i // 3 % 3) for i in range(32)]
    want = [reference(tiny, p, m, n) for p, m, n, _ in jobs]

    def send(job):
        prompt, mode, n, entry = job
        request = dict(text_input=prompt, mode=mode, max_tokens=n, block_length=8)
        if entry == 0:
            return grpc.generate(**request)
        return grpc.infer(**request) if entry == 1 else http_generate(server.http_url, **request)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(send, jobs))
    for (prompt, mode, n, entry), g, w in zip(jobs, got, want):
        assert g.token_ids == w.token_ids, (prompt, mode, n, entry)
        assert g.stats["nfe"] == w.stats.nfe
    assert max(r.stats["slots_in_use"] + r.stats["waiting"] for r in got) > 0  # they did overlap


BAD_REQUESTS = [
    (dict(mode="foo"), "unknown mode 'foo'"),
    (dict(max_tokens=0), "max_tokens must be an integer in [1, 2147483647], got 0"),
    (dict(max_tokens=-5), "max_tokens must be an integer in [1, 2147483647], got -5"),
    (dict(max_tokens=CAP + 1), f"over this deployment's cap of {CAP}"),
    (dict(block_length=0), "block_length must be an integer in"),
    (dict(block_length=999), "block_length must be an integer in"),
    (dict(threshold=1.5), "threshold must be a number in [0, 1]"),
    (dict(threshold=-0.5), "threshold must be a number in [0, 1]"),
    (dict(text_input=None), "missing text_input"),
    (dict(text_input=b"\xff\xfe"), "not valid UTF-8"),
    (dict(text_input="hi " * 600), "KV-cache positions, more than the 512"),
]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, grpc, bad, message):
    request = {"text_input": "hi", "max_tokens": 4, **bad}
    calls = [lambda: grpc.generate(**request), lambda: grpc.infer(**request)]
    if not isinstance(request["text_input"], bytes):  # JSON cannot carry invalid UTF-8
        calls.append(lambda: http_generate(server.http_url, **request))
    for call in calls:
        with pytest.raises(ClientError) as e:
            call()
        assert message in str(e.value)
    assert grpc.infer(text_input="hi", max_tokens=2).stats["tokens"] == 2


def test_unary_model_refuses_to_stream_and_unknown_mode_as_parameter(grpc):
    with pytest.raises(ClientError, match="decoupled model `nld`"):
        grpc.infer(text_input="hi", max_tokens=2, stream=True)
    with pytest.raises(ClientError, match="unknown mode 'nope'"):
        grpc.infer(text_input="hi", max_tokens=2, parameters={"mode": "nope"})


def _probe(grpc) -> dict:
    return grpc.generate(text_input="hi", max_tokens=1).stats


def _metric(server, name: str, model: str = "nld") -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name} for {model}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, grpc, protocol):
    before = _probe(grpc)["cancelled_total"]
    request = dict(text_input=PROMPTS[2], mode="linear_spec", block_length=4, max_tokens=CAP)
    stream = grpc.stream(**request) if protocol == "grpc" else http_generate_stream(server.http_url, **request)
    first = [next(stream) for _ in range(3)]
    assert sum(len(c.token_ids) for c in first) < CAP
    assert _probe(grpc)["slots_in_use"] == 1  # the stream holds a slot while the probe runs
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while (stats := _probe(grpc))["slots_in_use"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["slots_in_use"] == 0 and stats["cancelled_total"] == before + 1
    assert _metric(server, "nld_kv_slots_in_use") == 0 and _metric(server, "nld_kv_slots_total") == 8
    assert server.is_ready()


def test_client_command_streams_then_prints_stats(tiny, server):
    from nld_trt.serving.cli import client_command

    want = reference(tiny, PROMPTS[0], "linear_spec", 10)
    args = ["--url", server.grpc_url, "--mode", "linear_spec", "--max-tokens", "10", "--block-length", "8", PROMPTS[0]]
    out = CliRunner().invoke(client_command, args + ["--json"], catch_exceptions=False)
    assert json.loads(out.stdout)["token_ids"] == want.token_ids
    http = CliRunner().invoke(client_command, args + ["--protocol", "http", "--url", server.http_url, "--no-stream"],
                              catch_exceptions=False)
    assert http.stdout == want.text + "\n" and "linear_spec: 10 tokens" in http.stderr


def test_chat_command_keeps_the_conversation_and_switches_modes(tiny, server):
    from nld_trt.serving.cli import chat_command

    lines = "hello\n/mode dlm\nhow many apples?\n/mode nope\n/quit\n"
    out = CliRunner().invoke(chat_command, ["--url", server.grpc_url, "--max-tokens", "8", "--block-length", "8"],
                             input=lines, catch_exceptions=False)
    assert out.exit_code == 0 and "unknown mode 'nope'" in out.stderr
    first = tiny.generate("hello", mode="ar", max_new_tokens=8, block_length=8)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "how many apples?"}]
    second = tiny.generate(tiny.tokenizer.encode_chat(messages), mode="dlm", max_new_tokens=8, block_length=8)
    assert out.stdout == f"[ar] {first.text}\n[dlm] {second.text}\n"
    assert out.stderr.count("tokens,") == 2


OOM_ENTRY = """
import torch

from nld_trt.kv import attend


def no_room(self, layout, device):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (GPU 0; 139.80 GiB total capacity)")


attend.PagedCache.__init__ = no_room  # this copy's stub only: a KV pool that cannot be allocated

from nld_trt.serving.triton_model import TritonPythonModel  # noqa: E402,F401
"""


def load_over_http(url: str, model: str) -> tuple[int, str]:
    """POST /v2/repository/models/MODEL/load (explicit model control): (status, Triton's error text)."""
    request = urllib.request.Request(f"http://{url}/v2/repository/models/{model}/load", data=b"{}")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def test_a_model_too_big_for_the_memory_fails_its_load_with_one_line_that_says_what_to_lower(repo, tmp_path):
    """A copy of the repository whose `nld` entry point first makes the KV pool's allocation raise torch's CUDA
    out-of-memory error: the load fails with our one-line message naming what to lower, no frames below
    initialize, and the server stays up and serves from the other models."""
    copy = shutil.copytree(repo, tmp_path / "repo")
    entry = copy / "nld" / "1" / "model.py"
    entry.write_text(OOM_ENTRY)
    with TritonServer(copy, extra_args=["--model-control-mode=explicit"]) as server:
        status, error = load_over_http(server.http_url, "nld")
        assert status == 400, (status, error, server.tail())
        assert "out of memory (CUDA out of memory. Tried to allocate 80.00 GiB" in error, error
        assert "--max-batch" in error and "kv_cache_gb" in error and "Traceback" not in error, error
        assert re.findall(r"\.py\(\d+\): (\w+)", error) == ["initialize"], error
        assert load_over_http(server.http_url, "nld_sync") == (200, "")
        assert http_generate(server.http_url, model="nld_sync", text_input="hi", max_tokens=2).stats["tokens"] == 2
        assert server.stop() == 0


def test_serve_refuses_a_tampered_artifact_then_stops_cleanly(repo, tmp_path):
    copy = shutil.copytree(repo, tmp_path / "repo")
    weights = copy / "nld" / "1" / "artifacts" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "nld_trt.serving.cli", "serve", str(copy), "--model-control-mode", "explicit",
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{ports[0]}"
    try:
        _wait_ready(f"http://{address}", proc, log_file)

        status, error = load_over_http(address, "nld")
        assert status == 400 and "artifact model.safetensors is truncated" in error and "nld-trt package" in error
        # the backend stub appends the frames of the exception leaving initialize: none below it
        assert re.findall(r"\.py\(\d+\): (\w+)", error) == ["initialize"], error
        weights.write_bytes(good)
        assert load_over_http(address, "nld") == (200, "")
        assert http_generate(address, model="nld", text_input="hi", max_tokens=2).stats["tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_file.read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "tritonserver stopped" in log
    assert not [p for p in _processes() if str(copy) in p], "a backend stub outlived the server"


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise AssertionError("nld-trt serve did not become ready")


def _processes() -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                found.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found if os.path.isdir("/proc") else []


def first_kv_events(url: str) -> list:
    """Subscribe to `nld`'s KV events over gRPC as the Dynamo worker does; the first response's events."""
    import asyncio

    from nld_trt.serving.dynamo.kv import subscribe
    from nld_trt.serving.openai.triton import TritonBridge

    async def first() -> list:
        bridge = TritonBridge(url)
        try:
            async for events in subscribe(bridge):
                return events
            return []
        finally:
            await bridge.close()

    return asyncio.run(asyncio.wait_for(first(), 60))


def test_kv_events_are_published_unless_the_repository_was_packaged_without_them(server, tiny_dir, tmp_path):
    """The events carry every cached page's token ids to any client of the gRPC port: a deployment packaged with
    --no-kv-events (ServingOptions.kv_events=False) refuses the subscription with the reason, which the Dynamo
    worker takes as "route by load", and still serves."""
    from nld_trt.serving.dynamo.kv import NoKVEvents

    http_generate(server.http_url, model="nld", text_input=PROMPTS[2], max_tokens=4)  # a prompt of two pages or more
    events = first_kv_events(server.grpc_url)
    assert events[0] == {"type": "cleared"} and any(e["type"] == "stored" for e in events[1:]), events
    options = ServingOptions(max_batch=2, max_seq_len=256, torch_threads=1, kv_events=False)
    quiet = package_repository(tiny_dir, tmp_path / "repo", options)
    assert 'key: "kv_events" value { string_value: "false" }' in (quiet / "nld" / "config.pbtxt").read_text()
    with TritonServer(quiet) as other:
        with pytest.raises(NoKVEvents, match=r"does not publish KV events \(packaged with --no-kv-events"):
            first_kv_events(other.grpc_url)
        assert http_generate(other.http_url, model="nld", text_input="hi", max_tokens=2).stats["tokens"] == 2
        assert any("KV events off" in line for line in other.lines), other.tail()
        assert other.stop() == 0
