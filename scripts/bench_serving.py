#!/usr/bin/env python3
"""Serving overhead and throughput per decoding mode, through a real tritonserver.

1. Per mode, the same prompts one at a time in-process (`NLD.generate`) and through the server (gRPC
   stream to `nld`, and unary gRPC to `nld_sync`): mean latency of each, the ratios, whether tokens agree.
2. Per mode and concurrency (default 1, 4, 16), streaming: requests/s, generated tokens/s, p50/p99 latency,
   served and in-process through the same continuous-batching scheduler without Triton (so the ratio shows
   what Triton and its IPC cost, and the in-process figure what the decoding itself can do at that load).
The client keeps one gRPC stream per connection, as benchmark clients do (--fresh-streams: one per request,
as `nld-trt client` does; that costs the client a few milliseconds per request). One run each, on whatever
machine this is: compare numbers from the same run only.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click



def prompts(n: int, tasks: str) -> list[str]:
    """The first n questions of an evaluation set (what the embedded model was trained to answer)."""
    from nld_trt.evaluate import load_task

    return [p.question for p in load_task(tasks)[:n]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def scheduler_load(nld, texts: list[str], mode: str, max_tokens: int, block: int, concurrency: int,
                   n_requests: int) -> dict[str, float]:
    """`concurrency` clients in this process keep the serving scheduler busy (no Triton): tokens/s, p50 ms."""
    import threading

    import numpy as np

    from nld_trt.serving.backend import Scheduler, Update
    from nld_trt.serving.protocol import Limits, gather, prepare

    class Done:
        def __init__(self) -> None:
            self.event, self.tokens = threading.Event(), 0

        def send(self, u: Update) -> bool:
            if u.final:
                self.tokens = u.num_tokens
                self.event.set()
            return True

        def error(self, message: str) -> None:
            raise RuntimeError(message)

        def cancelled(self) -> bool:
            return False

        def close_cancelled(self) -> None:
            self.event.set()

    limits = Limits(max_tokens, max_tokens, streaming=True)
    scheduler = Scheduler(nld)

    def one(text: str) -> tuple[float, int]:
        start = time.perf_counter()
        fields = gather({"text_input": np.array([[text.encode()]], dtype=object)},
                        {"mode": mode, "max_tokens": max_tokens, "block_length": block, "stream": True})
        sink = Done()
        scheduler.submit(prepare(nld, fields, limits), sink)
        sink.event.wait()
        return time.perf_counter() - start, sink.tokens

    try:
        one(texts[0])
        jobs = [texts[i % len(texts)] for i in range(max(n_requests, concurrency))]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(one, jobs))
        wall = time.perf_counter() - start
    finally:
        scheduler.stop()
    return {"tokens_per_s": sum(d[1] for d in done) / wall, "p50_ms": 1e3 * percentile([d[0] for d in done], 50)}


def model_dir(path: str | None) -> tuple[Path, str]:
    from nld_trt.runtime import default_model_path

    return (Path(path), path) if path else (default_model_path(), "embedded default model")


@click.command()
@click.option("--model", "model_path", default=None, help="checkpoint (default: the embedded model, else a random tiny one)")
@click.option("--tasks", default="gsm_synth", show_default=True, help="prompts: a built-in set or a JSONL file")
@click.option("--prompts", "n_prompts", type=int, default=8, show_default=True, help="the first N questions")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
@click.option("--modes", default="ar,dlm,linear_spec", show_default=True, help="comma-separated; auto too")
@click.option("--concurrency", default="1,4,16", show_default=True)
@click.option("--requests", "n_requests", type=int, default=32, show_default=True, help="requests per concurrency level")
@click.option("--max-batch", type=int, default=16, show_default=True,
              help="sequences at once, in-process and served (a KV pool of max-batch x 1024 positions)")
@click.option("--threads", type=int, default=1, show_default=True,
              help="PyTorch CPU threads, in-process and per served instance (the same on both sides)")
@click.option("--fresh-streams", is_flag=True,
              help="open a gRPC stream per request (as `nld-trt client` does) instead of keeping one per connection")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="reuse cached prompt pages (the prompts repeat across modes and levels); off: nothing is shared")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also write the figures here")
def main(model_path, tasks, n_prompts, max_tokens, block_length, modes, concurrency, n_requests, max_batch, threads,
         fresh_streams, prefix_cache, json_out) -> None:
    import torch

    import nld_trt
    from nld_trt.serving.client import GrpcClient
    from nld_trt.serving.package import ServingOptions, package_repository
    from nld_trt.serving.server import TritonServer

    levels = [int(c) for c in concurrency.split(",")]
    modes = modes.split(",")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        path, what = model_dir(model_path)
        texts = prompts(n_prompts, tasks)
        nld = nld_trt.load(path, max_batch=max_batch, max_seq_len=1024, prefix_cache=prefix_cache)
        block = block_length or nld.config.block_size
        print(f"model: {what} ({path}); {n_prompts} prompts, max_tokens {max_tokens}, block {block}", file=sys.stderr)

        repo = package_repository(path, Path(tmp) / "repo",
                                  ServingOptions(max_batch=max_batch, max_seq_len=1024, max_tokens_cap=max_tokens,
                                                 torch_threads=threads, prefix_cache=prefix_cache))
        results: dict = {"model": what, "prompts": n_prompts, "max_tokens": max_tokens, "block_length": block,
                         "threads": threads, "modes": {}}
        with TritonServer(repo) as server:
            client = GrpcClient(server.grpc_url, keep_streams=not fresh_streams)

            def one(text: str, mode: str, unary: bool = False) -> tuple[float, int, list[int]]:
                start = time.perf_counter()
                call = client.infer if unary else client.generate  # nld_sync, or a stream from nld
                r = call(text_input=text, mode=mode, max_tokens=max_tokens, block_length=block)
                return time.perf_counter() - start, r.stats["tokens"], r.token_ids

            def local(text: str, mode: str) -> tuple[float, list[int]]:
                start = time.perf_counter()
                r = nld.generate(text, mode=mode, max_new_tokens=max_tokens, block_length=block)
                return time.perf_counter() - start, r.token_ids

            for mode in modes:
                local(texts[0], mode), one(texts[0], mode), one(texts[0], mode, unary=True)  # warm-up
                # interleaved, prompt by prompt, so that a busy machine slows every column alike
                runs = [(local(t, mode), one(t, mode), one(t, mode, unary=True)) for t in texts]
                row = {
                    "in_process_ms": 1e3 * statistics.mean(r[0][0] for r in runs),
                    "served_ms": 1e3 * statistics.mean(r[1][0] for r in runs),
                    "served_unary_ms": 1e3 * statistics.mean(r[2][0] for r in runs),
                    "tokens_agree": sum(r[0][1] == r[1][2] == r[2][2] for r in runs),
                    "load": {},
                }
                row["ratio"] = row["served_ms"] / row["in_process_ms"]
                for c in levels:
                    in_process = scheduler_load(nld, texts, mode, max_tokens, block, c, n_requests)
                    jobs = [texts[i % len(texts)] for i in range(max(n_requests, c))]
                    start = time.perf_counter()
                    with ThreadPoolExecutor(c) as pool:
                        done = list(pool.map(lambda t: one(t, mode), jobs))
                    wall = time.perf_counter() - start
                    latencies = [d[0] for d in done]
                    row["load"][c] = {
                        "requests_per_s": len(jobs) / wall,
                        "tokens_per_s": sum(d[1] for d in done) / wall,
                        "p50_ms": 1e3 * percentile(latencies, 50),
                        "p99_ms": 1e3 * percentile(latencies, 99),
                        "in_process_tokens_per_s": in_process["tokens_per_s"],
                        "in_process_p50_ms": in_process["p50_ms"],
                    }
                results["modes"][mode] = row
                print(f"{mode} done", file=sys.stderr)
            client.close()  # its open streams would hold the server until its exit timeout
            server.stop()

    print(f"\n{what}: {n_prompts} prompts, max_tokens {max_tokens}, block {block}, up to {max_batch} sequences "
          f"(KV: {nld.executor.layout.describe()}, prefix cache {'on' if prefix_cache else 'off'}), {threads} thread(s)")
    print(f"{'mode':12} {'in-process ms':>14} {'stream ms':>10} {'ratio':>6} {'unary ms':>9} {'ratio':>6} "
          f"{'same tokens':>12}")
    for mode, row in results["modes"].items():
        print(f"{mode:12} {row['in_process_ms']:14.1f} {row['served_ms']:10.1f} {row['ratio']:6.2f} "
              f"{row['served_unary_ms']:9.1f} {row['served_unary_ms'] / row['in_process_ms']:6.2f} "
              f"{row['tokens_agree']:>7}/{n_prompts}")
    print(f"\n{'mode':12} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'in-process tok/s':>17} {'served/in-process':>18} {'x conc 1':>9}")
    for mode, row in results["modes"].items():
        base = row["load"][levels[0]]["tokens_per_s"]
        for c, load in row["load"].items():
            print(f"{mode:12} {c:4d} {load['requests_per_s']:7.2f} {load['tokens_per_s']:8.1f} "
                  f"{load['p50_ms']:8.1f} {load['p99_ms']:8.1f} {load['in_process_tokens_per_s']:17.1f} "
                  f"{load['tokens_per_s'] / load['in_process_tokens_per_s']:18.2f} {load['tokens_per_s'] / base:9.2f}")
    if "auto" in results["modes"]:
        fixed = [m for m in results["modes"] if m in ("ar", "linear_spec")]
        print(f"\nauto vs the better of {' and '.join(fixed)} (tokens/s, served):")
        for c in levels:
            best = max(results["modes"][m]["load"][c]["tokens_per_s"] for m in fixed)
            print(f"  concurrency {c:3d}: {results['modes']['auto']['load'][c]['tokens_per_s'] / best:.2f}x")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
