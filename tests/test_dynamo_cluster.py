"""nld-trt behind NVIDIA Dynamo, for real: `nld-trt cluster` of the embedded model (2 tritonservers, 2 Dynamo
workers, a Dynamo frontend with the KV router, all on loopback), one cluster for this module, called with the real
`openai` SDK; a second frontend with round-robin routing joins the same workers (cluster.json says how).

The served tokens must be the in-process greedy tokens in every mode (the mode as an nvext annotation), unary and
streaming, chat and completions; n > 1 gives the sequences the direct path gives; refusals come back as errors
naming the field; both workers serve; a client that leaves frees its KV on the worker that held it; with the paged
KV cache, KV routing gets more prefix-cache hits than round-robin on multi-turn chats; a worker killed mid-run
loses no request (migration) and the other serves what follows; SIGTERM stops every process the cluster started.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai_stack import CAP, ENDLESS, require_stack

require_stack()
try:
    import dynamo.frontend  # noqa: F401
    import dynamo.llm  # noqa: F401
except ImportError as e:  # pragma: no cover - the README's test command installs it
    pytest.skip(f"NVIDIA Dynamo is not installed ({e}): pip install -e '.[dynamo]' && pip install --no-deps "
                "ai-dynamo==1.6.1", allow_module_level=True)

import openai  # noqa: E402

import nld_trt  # noqa: E402
from nld_trt.serving.package import ServingOptions, package_repository  # noqa: E402
from nld_trt.serving.server import free_port  # noqa: E402

MODES = ("ar", "dlm", "linear_spec", "auto")
QUESTION = "Tom has 12 apples. He gives 5 to Sam and buys 3 more. How many apples does Tom have now?"
MESSAGES = [{"role": "system", "content": "Answer step by step."}, {"role": "user", "content": QUESTION}]
RAW = "A pack holds 6 pens. Mia buys 4 packs."
MAX_TOKENS = 40


def annotate(mode: str, ids: bool = True) -> dict:
    """NLD's mode as an nvext annotation; Dynamo's response extras: the serving worker, the generated ids (one
    choice only)."""
    fields = ["worker_id", "completion_token_ids"] if ids else ["worker_id"]
    return {"nvext": {"annotations": [f"nld.mode={mode}"], "extra_fields": fields}}


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def listening_addresses(pids: set[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                out.append(cols[1])
    return out


def is_loopback(address: str) -> bool:
    """A /proc/net/tcp{,6} local address (hex, little-endian words) on 127.0.0.0/8 or ::1 (or v4-mapped 127.x)."""
    host = address.split(":")[0]
    if len(host) == 8:
        return host.endswith("7F")
    return host == "00000000000000000000000001000000" or (host[:16] == "0" * 16 and host[16:24] == "FFFF0000"
                                                          and host[30:32] == "7F")


@dataclass
class Deployment:
    process: subprocess.Popen
    logs: Path
    info: dict
    extra_frontend: subprocess.Popen | None = None
    extra_url: str = ""

    @property
    def url(self) -> str:
        return self.info["url"]

    def metric(self, worker: int, name: str) -> float | None:
        text = urllib.request.urlopen(self.info["workers"][worker]["metrics"], timeout=10).read().decode()
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") and 'model="nld"' in line]
        return sum(values) if values else None

    def stop_extra(self) -> None:
        if self.extra_frontend is not None and self.extra_frontend.poll() is None:
            self.extra_frontend.send_signal(signal.SIGTERM)
            self.extra_frontend.wait(30)


def wait_http(url: str, timeout: float, ok=lambda body: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(json.loads(r.read())):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dynamo")
    repo = package_repository(None, directory / "repo", ServingOptions(max_batch=8, max_seq_len=1024, max_tokens_cap=CAP,
                                                                       torch_threads=1), sync_model=False)
    logs = directory / "logs"
    out = open(directory / "cluster.out", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen([sys.executable, "-m", "nld_trt.cli", "cluster", str(repo), "--workers", "2",
                                "--router-mode", "kv", "--http-port", str(free_port()), "--migration-limit", "3",
                                "--log-dir", str(logs)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (logs / "cluster.json").is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("nld-trt cluster did not start:\n" + (directory / "cluster.out").read_text()[-4000:])
        time.sleep(0.2)
    info = json.loads((logs / "cluster.json").read_text())
    deployment = Deployment(process, logs, info)
    # a second frontend, round-robin, joining the same workers with the cluster's Dynamo environment
    port = free_port()
    env = {**os.environ, **info["dynamo_env"]}
    deployment.extra_frontend = subprocess.Popen(
        [sys.executable, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
         "--discovery-backend", "file", "--router-mode", "round-robin", "--migration-limit", "3"], env=env,
        stdout=open(logs / "frontend-round-robin.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deployment.extra_url = f"http://127.0.0.1:{port}"
    wait_http(f"{deployment.extra_url}/health", 60,
              lambda body: sum(i.get("endpoint") == "generate" for i in body.get("instances", [])) == 2)
    yield deployment
    deployment.stop_extra()
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    out.close()


@pytest.fixture(scope="module")
def nld():
    import torch

    torch.set_num_threads(1)
    return nld_trt.load(max_batch=4, max_seq_len=1024)


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


def served_ids(response) -> list[int]:
    return response.model_extra["nvext"]["completion_token_ids"]


# the served tokens are the in-process tokens ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_in_process_greedy_tokens_unary_and_streaming(nld, client, mode):
    want = nld.generate(MESSAGES, mode=mode, max_new_tokens=MAX_TOKENS)
    unary = client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                           extra_body=annotate(mode))
    assert served_ids(unary) == want.token_ids[: len(served_ids(unary))]
    assert unary.choices[0].message.content == want.text
    assert unary.usage.prompt_tokens == len(want.prompt_token_ids)
    assert unary.usage.completion_tokens == len(want.token_ids)
    text, ids, finish = [], [], None
    for chunk in client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
                                                extra_body=annotate(mode)):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            ids += (chunk.model_extra.get("nvext") or {}).get("completion_token_ids") or []
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(text) == want.text
    assert finish == {"eos": "stop", "stop": "stop", "length": "length"}[want.finish_reason]


def test_completions_get_the_direct_paths_tokens_for_text_and_token_id_prompts(nld, client):
    """Dynamo's frontend tokenizes a completion prompt without BOS; the worker puts it back, as the direct path
    tokenizes; token ids that start with it stay as they are."""
    want = nld.generate(RAW, chat=False, mode="linear_spec", max_new_tokens=MAX_TOKENS)
    text = client.completions.create(model="nld", prompt=RAW, max_tokens=MAX_TOKENS, extra_body=annotate("linear_spec"))
    assert text.choices[0].text == want.text
    assert text.usage.prompt_tokens == len(want.prompt_token_ids)  # the worker's usage: BOS included
    ids = client.completions.create(model="nld", prompt=want.prompt_token_ids, max_tokens=MAX_TOKENS,
                                    extra_body=annotate("linear_spec"))
    assert ids.choices[0].text == want.text


def test_n_sequences_and_stop_strings_match_the_direct_path(nld, client):
    seeds = [nld.generate(MESSAGES, mode="ar", max_new_tokens=24, temperature=0.8, seed=7 + i).text for i in range(2)]
    r = client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=24, n=2, temperature=0.8, seed=7,
                                       extra_body=annotate("ar", ids=False))
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == seeds
    streamed: dict[int, list[str]] = {0: [], 1: []}
    for chunk in client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=24, n=2, temperature=0.8,
                                                seed=7, stream=True, extra_body=annotate("ar", ids=False)):
        for c in chunk.choices:
            streamed[c.index].append(c.delta.content or "")
    assert ["".join(streamed[0]), "".join(streamed[1])] == seeds
    full = nld.generate(MESSAGES, mode="dlm", max_new_tokens=MAX_TOKENS).text
    stop = full.split()[3]
    want = nld.generate(MESSAGES, mode="dlm", max_new_tokens=MAX_TOKENS, stop=[stop])
    r = client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=MAX_TOKENS, stop=[stop],
                                       extra_body=annotate("dlm"))
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"


def test_the_thinking_budget_and_template_kwargs_reach_the_model(nld, client):
    """chat_template_kwargs render Dynamo's template; nvext.max_thinking_tokens becomes the model's thinking budget
    (end-think forced at that index). The thinking stays in content: Dynamo's reasoning parsers expect the model to
    open [THINK] itself, NLD's template opens it in the prompt."""
    end_think = nld.tokenizer.token_id("[/THINK]")
    want = nld.generate(MESSAGES, mode="ar", max_new_tokens=24, template_kwargs={"enable_thinking": True},
                        max_thinking_tokens=6, end_think_token_id=end_think)
    assert want.token_ids[6] == end_think
    r = client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=24, extra_body={
        "chat_template_kwargs": {"enable_thinking": True},
        "nvext": {"max_thinking_tokens": 6, "annotations": ["nld.mode=ar"], "extra_fields": ["completion_token_ids"]}})
    assert served_ids(r) == want.token_ids and r.choices[0].message.content == want.text


def test_text_parts_are_joined_with_a_newline_through_dynamo(nld, client):
    """Dynamo's frontend joins a message's text parts with "\\n" (as vLLM does); nld-trt's own front end joins them
    with "". The one rendering difference between the two paths, pinned here."""
    parts = [{"type": "text", "text": "Tom has 12 apples."}, {"type": "text", "text": "How many does he have?"}]
    newline = [{"role": "user", "content": "Tom has 12 apples.\nHow many does he have?"}]
    want = nld.generate(newline, mode="ar", max_new_tokens=16)
    r = client.chat.completions.create(model="nld", messages=[{"role": "user", "content": parts}], max_tokens=16,
                                       extra_body=annotate("ar"))
    assert served_ids(r) == want.token_ids and r.usage.prompt_tokens == len(want.prompt_token_ids)
    direct = nld.tokenizer.encode_chat([{"role": "user", "content": "Tom has 12 apples.How many does he have?"}])
    assert direct != want.prompt_token_ids


# refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(extra_body={"nvext": {"annotations": ["nld.mode=fast"]}}), "nld.mode: Input should be 'ar'"),
    (dict(extra_body={"nvext": {"annotations": ["nld.block_length=999"]}}), "block_length 999 is over this deployment"),
    (dict(extra_body={"nvext": {"annotations": ["nld.speed=2"]}}), "unknown annotation nld.speed"),
    (dict(frequency_penalty=0.5), "penalties are not supported"),
    (dict(max_tokens=CAP + 1), f"max_tokens {CAP + 1} is over this deployment's cap of {CAP}"),
])
def test_refusals_name_the_field_unary_and_streaming(client, kwargs, words):
    body = {"model": "nld", "messages": MESSAGES, "max_tokens": 8, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:  # HTTP 400 {"message": ..., "type": "Bad Request", "code": 400}
        client.chat.completions.create(**body)
    assert words in str(e.value)
    with pytest.raises(openai.APIError) as e:  # SSE: data: {"error": {"message": ..., ...}}
        for _ in client.chat.completions.create(**body, stream=True):
            pass
    assert words in str(e.value)
    assert client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=4).choices[0].message.content


def test_what_the_frontend_refuses_before_routing_is_an_error_too(client):
    with pytest.raises(openai.BadRequestError, match="mode"):  # NLD fields cannot ride as extra body keys
        client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=4, extra_body={"mode": "dlm"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=4)


# both workers, disconnects ------------------------------------------------------------------------------------
def test_both_workers_serve(cluster):
    rr = openai.OpenAI(base_url=f"{cluster.extra_url}/v1", api_key="unused", max_retries=0, timeout=120)
    served = {rr.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=4, extra_body=annotate("ar"))
              .model_extra["nvext"]["worker_id"]["decode_worker_id"] for _ in range(6)}
    assert len(served) == 2


def test_a_client_that_leaves_frees_the_kv_on_the_worker_that_held_it(cluster, client):
    before = [cluster.metric(w, "nld_kv_slots_in_use") for w in (0, 1)]
    assert before == [0, 0]
    stream = client.completions.create(model="nld", prompt=ENDLESS, max_tokens=CAP, stream=True,
                                       extra_body={"min_tokens": CAP, **annotate("ar")})
    chunks = iter(stream)
    for _ in range(3):
        assert next(chunks).choices[0].finish_reason is None
    held = [cluster.metric(w, "nld_kv_slots_in_use") for w in (0, 1)]
    assert sorted(held) == [0, 1]  # one worker's model holds the stream's KV
    worker = held.index(1)
    stream.close()
    deadline = time.monotonic() + 30
    while cluster.metric(worker, "nld_kv_slots_in_use") != 0:
        assert time.monotonic() < deadline, "the KV was not freed"
        time.sleep(0.05)
    pages = cluster.metric(worker, "nld_kv_pages_used")
    assert pages in (None, 0)  # with the paged KV cache: no page held either
    log = (cluster.logs / f"tritonserver-{worker}.log").read_text()
    cancelled = [int(line.split("after ")[1].split()[0]) for line in log.splitlines() if "cancelled by its client" in line]
    assert cancelled and cancelled[-1] < CAP  # cancelled mid-way, not finished


# KV-aware routing -------------------------------------------------------------------------------------------
def conversation(i: int) -> list[dict]:
    topic = " ".join(f"item{(i * 7 + k) % 41}" for k in range(24))
    return [{"role": "system", "content": f"Conversation {i}. You keep a list: {topic}. Answer briefly."}]


def chats(base_url: str, first: int, count: int, turns: int) -> list[float]:
    """`count` conversations of `turns` turns each, turn by turn round the conversations; time to first token of each
    turn after the first (the ones that can reuse a cached prefix)."""
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    talks = [conversation(first + i) for i in range(count)]
    ttft = []
    for turn in range(turns):
        for i, talk in enumerate(talks):
            talk.append({"role": "user", "content": f"Question {turn} of conversation {first + i}: what is item {turn}?"})
            start = time.perf_counter()
            first_at, text = None, []
            for chunk in c.chat.completions.create(model="nld", messages=talk, max_tokens=12, stream=True,
                                                   extra_body=annotate("ar")):
                if chunk.choices and chunk.choices[0].delta.content and first_at is None:
                    first_at = time.perf_counter() - start
                text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            talk.append({"role": "assistant", "content": "".join(text)})
            if turn:
                ttft.append(first_at if first_at is not None else time.perf_counter() - start)
    return ttft


def prefix_counters(cluster) -> tuple[float, float]:
    hits = sum(cluster.metric(w, "nld_prefix_cache_hits_total") or 0 for w in (0, 1))
    queries = sum(cluster.metric(w, "nld_prefix_cache_queries_total") or 0 for w in (0, 1))
    return hits, queries


def test_kv_routing_gets_more_prefix_cache_hits_than_round_robin(cluster):
    if cluster.metric(0, "nld_prefix_cache_queries_total") is None:
        pytest.skip("the served model has no prefix cache (the paged KV cache is not in this build)")
    figures = {}
    # an odd number of conversations: round-robin over two workers then sends each turn to the other worker than
    # the turn before (with an even number it would keep every conversation on one worker, by accident)
    for name, url, first in (("kv", cluster.url, 0), ("round-robin", cluster.extra_url, 100)):
        hits0, queries0 = prefix_counters(cluster)
        ttft = chats(url, first, count=5, turns=4)
        hits, queries = prefix_counters(cluster)
        figures[name] = ((hits - hits0) / max(queries - queries0, 1), 1e3 * sum(ttft) / len(ttft))
    print("\nprefix-cache hit rate / mean TTFT of later turns: "
          + ", ".join(f"{k} {rate:.1%} / {ms:.1f} ms" for k, (rate, ms) in figures.items()))
    assert figures["kv"][0] > figures["round-robin"][0]


# a worker dies; the cluster stops ---------------------------------------------------------------------------
def instance_id(cluster, worker: int) -> int:
    """A worker's Dynamo instance id, from the line it announces itself with."""
    line = next(l for l in (cluster.logs / f"worker-{worker}.log").read_text().splitlines() if "nld-trt: worker " in l)
    return int(line.split("nld-trt: worker ")[1].split()[0])


def test_a_killed_worker_loses_no_request_and_the_other_serves_the_next(cluster, client):
    doomed = instance_id(cluster, 0)
    streams = []
    while not any(worker == doomed for _, worker, _ in streams):  # until one stream is on the worker to kill
        assert len(streams) < 8, "no stream went to worker 0"
        it = iter(client.completions.create(model="nld", prompt=ENDLESS, max_tokens=CAP, stream=True,
                                            extra_body={"min_tokens": CAP, **annotate("ar")}))
        first = next(it)
        streams.append((it, first.model_extra["nvext"]["worker_id"]["decode_worker_id"], first))
    os.kill(cluster.info["workers"][0]["pid"], signal.SIGKILL)
    for it, _, first in streams:  # every stream finishes, the dead worker's on the survivor (migration)
        finish, tokens = None, 0
        for chunk in itertools.chain([first], it):  # a chunk may carry several tokens (a busy worker batches them)
            finish = chunk.choices[0].finish_reason or finish
            tokens += len(chunk.model_extra["nvext"].get("completion_token_ids") or [])
        assert (finish, tokens) == ("length", CAP)
    assert "migration retry scheduled" in (cluster.logs / "frontend.log").read_text()
    # the next requests all succeed, on the survivor's tritonserver (until the dead worker's discovery entry
    # expires, ~26 s, the router may still pick it and nvext names that first pick: the request then migrates)
    before = cluster.metric(1, "nv_inference_request_success")
    answers = {client.chat.completions.create(model="nld", messages=MESSAGES, max_tokens=6,
                                              extra_body=annotate("ar")).choices[0].message.content for _ in range(8)}
    assert len(answers) == 1 and answers != {""}
    assert cluster.metric(1, "nv_inference_request_success") - before == 8
    deadline = time.monotonic() + 10
    while "worker-0 exited" not in (cluster.logs.parent / "cluster.out").read_text():
        assert time.monotonic() < deadline, "the cluster did not report the dead worker"
        time.sleep(0.2)


def test_every_process_stays_on_loopback_and_sigterm_stops_them_all(cluster):
    cluster.stop_extra()
    started = descendants(cluster.process.pid)
    assert len(started) >= 6  # frontend, a worker, 2 tritonservers and their model stubs
    wide = [a for a in listening_addresses(started | {cluster.process.pid}) if not is_loopback(a)]
    assert wide == [], wide
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(90) == 0
    time.sleep(0.5)
    alive = [pid for pid in started if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
    assert "cluster stopped" in (cluster.logs.parent / "cluster.out").read_text()
