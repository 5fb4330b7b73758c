#!/usr/bin/env python3
"""What the OpenAI front end costs: the same requests as direct gRPC streams to Triton and as streaming
OpenAI chat completions through the front end, against one `nld-trt serve` deployment, in one run.

Per mode and concurrency (default 1 and 16): mean and p50 latency, requests/s and tokens/s both ways, the
ratios, and whether both ways gave the same text. The two ways alternate in rounds over the same prompts
(ABBA order) so that drift of a shared machine hits both alike. The direct client is `tritonclient.grpc.aio` (through
the front end's own bridge, the same calls it makes); the OpenAI client is plain httpx reading SSE (the SDK's
parsing cost is the client's, not the front end's). CPU milliseconds per request of this client and of the
front end's process (`nld-trt serve`, which runs only the front end beside tritonserver) show where the time
goes on a machine whose cores the model shares.

Targets (issue 13): latency overhead <= 10% at concurrency 1; throughput at concurrency 16 within 5%.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click

MODES = ("ar", "dlm", "linear_spec")


def start(work: Path, slots: int) -> tuple[subprocess.Popen, str, str]:
    from nld_trt.serving.package import ServingOptions, package_repository
    from nld_trt.serving.server import free_port

    repo = package_repository(None, work / "repo", ServingOptions(max_batch=slots, max_seq_len=1024, torch_threads=1))
    http, grpc, metrics, port = (free_port() for _ in range(4))
    log = open(work / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "nld_trt.serving.cli", "serve", str(repo), "--http-port",
                                str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                "--openai-port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("nld-trt serve exited:\n" + (work / "serve.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return process, f"127.0.0.1:{grpc}", url
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("nld-trt serve did not become ready")


async def direct(bridge, question: str, mode: str, max_tokens: int) -> tuple[str, int]:
    fields = {"messages": json.dumps([{"role": "user", "content": question}]), "max_tokens": max_tokens, "mode": mode}
    text, tokens = [], 0
    async for piece in bridge.generate(fields):
        text.append(piece.text)
        tokens = piece.num_tokens
    return "".join(text), tokens


async def openai(client, url: str, question: str, mode: str, max_tokens: int) -> tuple[str, int]:
    body = {"model": "nld", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "mode": mode, "stream": True, "stream_options": {"include_usage": True}}
    text, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def level(call, questions: list[str], concurrency: int, front_pid: int) -> dict:
    """Run every question once with `concurrency` in flight: per-request latencies, wall time, outputs, and the
    CPU seconds this client and the front end's process spent on it."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, q in enumerate(questions):
        queue.put_nowait((i, q))
    latencies, outputs = [0.0] * len(questions), [("", 0)] * len(questions)

    async def worker() -> None:
        while not queue.empty():
            i, q = queue.get_nowait()
            t = time.perf_counter()
            outputs[i] = await call(q)
            latencies[i] = time.perf_counter() - t

    start, client_cpu, front_cpu = time.perf_counter(), time.process_time(), cpu_seconds(front_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "wall": time.perf_counter() - start, "outputs": outputs,
            "client_cpu": time.process_time() - client_cpu, "front_cpu": cpu_seconds(front_pid) - front_cpu}


async def measure(front_pid: int, grpc_url: str, url: str, questions: list[str], modes: list[str], levels: list[int],
                  requests: int, rounds: int, max_tokens: int) -> list[dict]:
    import httpx

    from nld_trt.serving.openai.triton import TritonBridge

    bridge = TritonBridge(grpc_url)
    rows = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as client:
        ways = {"grpc": lambda q, m: direct(bridge, q, m, max_tokens),
                "openai": lambda q, m: openai(client, url, q, m, max_tokens)}
        for mode in modes:  # warm both paths
            for way in ways.values():
                await way(questions[0], mode)
        for mode in modes:
            for c in levels:
                batch = [questions[i % len(questions)] for i in range(max(requests, c))]
                runs: dict[str, list[dict]] = {"grpc": [], "openai": []}
                for r in range(rounds):  # ABBA order: a drift of the shared machine hits both ways alike
                    for name in (("grpc", "openai") if r % 2 == 0 else ("openai", "grpc")):
                        way = ways[name]
                        runs[name].append(await level(lambda q, w=way: w(q, mode), batch, c, front_pid))
                row = {"mode": mode, "concurrency": c, "requests": len(batch) * rounds}
                for name, results in runs.items():
                    lat = [x for r in results for x in r["latencies"]]
                    wall = sum(r["wall"] for r in results)
                    tokens = sum(t for r in results for _, t in r["outputs"])
                    row[name] = {"mean_ms": 1e3 * statistics.fmean(lat), "p50_ms": 1e3 * statistics.median(lat),
                                 "req_s": len(lat) / wall, "tok_s": tokens / wall,
                                 "client_cpu_ms": 1e3 * sum(r["client_cpu"] for r in results) / len(lat),
                                 "front_cpu_ms": 1e3 * sum(r["front_cpu"] for r in results) / len(lat)}
                row["same_text"] = sum(g[0] == o[0] for rg, ro in zip(runs["grpc"], runs["openai"])
                                       for g, o in zip(rg["outputs"], ro["outputs"]))
                rows.append(row)
                print(f"  {mode} c={c}: grpc {row['grpc']['mean_ms']:.1f} ms, openai {row['openai']['mean_ms']:.1f} ms",
                      file=sys.stderr)
    await bridge.close()
    return rows


@click.command()
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--concurrency", default="1,16", show_default=True)
@click.option("--prompts", "n_prompts", type=int, default=16, show_default=True, help="evaluation-set questions")
@click.option("--requests", type=int, default=32, show_default=True, help="requests per round and concurrency")
@click.option("--rounds", type=int, default=6, show_default=True, help="rounds of both ways, in ABBA order")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--slots", type=int, default=16, show_default=True, help="KV slots of the deployment")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also write the figures here")
def main(modes, concurrency, n_prompts, requests, rounds, max_tokens, slots, json_out) -> None:
    from nld_trt.evaluate import load_task

    modes_list = [m for m in modes.split(",") if m]
    levels = [int(c) for c in concurrency.split(",") if c]
    questions = [p.question for p in load_task("gsm_synth")[:n_prompts]]
    with tempfile.TemporaryDirectory(prefix="nld-bench-openai-") as tmp:
        process, grpc_url, url = start(Path(tmp), slots)
        try:
            rows = asyncio.run(measure(process.pid, grpc_url, url, questions, modes_list, levels, requests, rounds, max_tokens))
        finally:
            process.terminate()
            process.wait(60)
    print(f"OpenAI front end vs direct gRPC streaming ({len(questions)} evaluation questions, max_tokens {max_tokens}, "
          f"{rounds} rounds in ABBA order, {slots} KV slots; one run)")
    print("| mode | conc | requests | gRPC mean ms | OpenAI mean ms | latency overhead | gRPC p50 | OpenAI p50 "
          "| gRPC req/s | OpenAI req/s | throughput ratio | same text | CPU ms/request: client gRPC / OpenAI, front end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, o = r["grpc"], r["openai"]
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {g['mean_ms']:.1f} | {o['mean_ms']:.1f} | "
              f"{100 * (o['mean_ms'] / g['mean_ms'] - 1):+.1f}% | {g['p50_ms']:.1f} | {o['p50_ms']:.1f} | "
              f"{g['req_s']:.2f} | {o['req_s']:.2f} | {o['req_s'] / g['req_s']:.3f} | {r['same_text']}/{r['requests']} | "
              f"{g['client_cpu_ms']:.1f} / {o['client_cpu_ms']:.1f}, {o['front_cpu_ms']:.1f} |")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
