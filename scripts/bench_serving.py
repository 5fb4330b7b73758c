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

`--images` (a vision-language model: `--model DIR`, else a random one, `--random tiny|8b-tower` as
scripts/bench_images.py builds them) measures instead:
1. What a large image costs the other requests: a streaming text request decodes while a request with a large
   image (`--stall-size`) arrives; its gaps between responses (inter-token latency) before, during and after the
   image's encoding, with the encoder on the scheduler thread (`image_workers=0`, the path before image workers)
   and on an image worker (`image_workers=1`), in-process (the serving scheduler, no Triton).
2. Latency and throughput at each concurrency for requests with an image (each a picture not seen before, so
   each pays its encoding) and without, in-process and served (gRPC streams with `image_url_input`).
3. Time to first token with a fresh image and with the same request again (its image already encoded; with the
   prefix cache on, `--prefix-cache`, its prompt's KV pages reused too, keyed by the image's content).
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
@click.option("--images", is_flag=True, help="image requests instead (a vision-language model; see the docstring)")
@click.option("--random", "random_kind", default="tiny", show_default=True,
              help="--images without --model: a random VLM, tiny or 8b-tower")
@click.option("--image-size", default="448x336", show_default=True, help="--images: each image request's picture")
@click.option("--stall-size", default="840x840", show_default=True, help="--images: the large image of the stall run")
@click.option("--sections", default="stall,load,ttft", show_default=True, help="--images: which measurements to run")
def main(model_path, tasks, n_prompts, max_tokens, block_length, modes, concurrency, n_requests, max_batch, threads,
         fresh_streams, prefix_cache, json_out, images, random_kind, image_size, stall_size, sections) -> None:
    import torch

    if images:
        return images_main(model_path, random_kind, n_prompts, tasks, max_tokens, block_length,
                           [int(c) for c in concurrency.split(",")], n_requests, max_batch, threads, image_size,
                           stall_size, sections.split(","), prefix_cache, json_out)

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


# --images ---------------------------------------------------------------------------------------------------
class Collect:
    """A Sink that keeps each response's arrival time and token count."""

    def __init__(self) -> None:
        import threading

        self.event, self.times, self.tokens, self.failure = threading.Event(), [], [], None

    def send(self, u) -> bool:
        self.times.append(time.perf_counter())
        self.tokens.append(u.num_tokens)
        if u.final:
            self.event.set()
        return True

    def error(self, message: str) -> None:
        self.failure = message
        self.event.set()

    def cancelled(self) -> bool:
        return False

    def close_cancelled(self) -> None:
        self.event.set()


def image_url(width: int, height: int, seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_fields(text: str, url: str | None, mode: str, max_tokens: int, block: int) -> dict:
    """One request's model inputs: min_tokens = max_tokens, so that a random model's early EOS does not shorten it."""
    fields = {"text_input": text, "mode": mode, "max_tokens": max_tokens, "min_tokens": max_tokens,
              "block_length": block, "stream": True}
    return {**fields, "image_url_input": [url]} if url else fields


def submit(scheduler, nld, limits, fields: dict) -> Collect:
    import numpy as np

    from nld_trt.serving.protocol import gather, prepare

    inputs = {"text_input": np.array([[fields["text_input"].encode()]], dtype=object)}
    if "image_url_input" in fields:
        inputs["image_url_input"] = np.array([[u.encode() for u in fields["image_url_input"]]], dtype=object)
    params = {k: v for k, v in fields.items() if k not in inputs}
    sink = Collect()
    scheduler.submit(prepare(nld, gather(inputs, params), limits, defer_images=True), sink)
    return sink


def stall(nld, limits, workers: int, big: tuple[int, int], block: int, seed: int) -> dict:
    """A 400-token `ar` text stream; after 40 of its tokens a request with a `big` image arrives. Its response gaps
    while that image is prepared, encoded and prefilled (the window: from submitting it until its first response)
    against the gaps before it."""
    from nld_trt.serving.backend import Scheduler

    nld.image_encoder.clear()
    encoded_before = nld.image_encoder.encode_s
    scheduler = Scheduler(nld, image_workers=workers)
    try:
        text = submit(scheduler, nld, limits, request_fields("Tell me a long story.", None, "ar", 400, block))
        while not text.tokens or text.tokens[-1] < 40:
            time.sleep(0.001)
        url = image_url(*big, seed)
        sent = time.perf_counter()
        image = submit(scheduler, nld, limits, request_fields("What is in the picture?", url, "ar", 8, block))
        image.event.wait()
        text.event.wait()
    finally:
        scheduler.stop()
    if image.failure or text.failure:
        raise RuntimeError(f"the stall run failed: {image.failure or text.failure}")
    first = image.times[0]
    gaps = list(zip(text.times[1:], [b - a for a, b in zip(text.times, text.times[1:])]))
    per_token = lambda window: [g / max(1, n) for (t, g), n in window]  # noqa: E731
    steps = [b - a for a, b in zip(text.tokens, text.tokens[1:])]
    before = [((t, g), n) for (t, g), n in zip(gaps, steps) if t < sent]
    # a gap overlapping the window counts (the text's response after the image's prefill ends the longest one)
    during = [((t, g), n) for (t, g), n in zip(gaps, steps) if t > sent and t - g < first]
    return {"workers": workers, "image_ttft_s": first - sent, "encode_s": nld.image_encoder.encode_s - encoded_before,
            "before_p50_ms": 1e3 * statistics.median(per_token(before)),
            "during_p50_ms": 1e3 * statistics.median(per_token(during)) if during else float("nan"),
            "during_max_gap_ms": 1e3 * max((g for (_, g), _ in during), default=0.0),
            "during_responses": len(during),
            "max_gap_ms": 1e3 * max(g for _, g in gaps)}


def load_run(run_one, jobs: list[dict], concurrency: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - start
    return {"tokens_per_s": sum(d[2] for d in done) / wall, "p50_ms": 1e3 * percentile([d[0] for d in done], 50),
            "p99_ms": 1e3 * percentile([d[0] for d in done], 99),
            "ttft_p50_ms": 1e3 * percentile([d[1] for d in done], 50)}


def images_main(model_path, random_kind, n_prompts, tasks, max_tokens, block_length, levels, n_requests, max_batch,
                threads, image_size, stall_size, sections, prefix_cache, json_out) -> None:
    import torch

    import nld_trt
    from nld_trt.serving.backend import Scheduler
    from nld_trt.serving.client import GrpcClient
    from nld_trt.serving.package import ServingOptions, package_repository
    from nld_trt.serving.protocol import Limits
    from nld_trt.serving.server import TritonServer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_images import parse_sizes, random_checkpoint

    torch.set_num_threads(threads)
    size, big = parse_sizes(image_size)[0], parse_sizes(stall_size)[0]
    with tempfile.TemporaryDirectory(prefix="bench-serving-images-") as tmp:
        path = Path(model_path) if model_path else random_checkpoint(random_kind, Path(tmp), lambda m: print(m, file=sys.stderr))
        what = model_path or f"random {random_kind} VLM"
        nld = nld_trt.load(path, max_batch=max_batch, max_seq_len=4096, prefix_cache=prefix_cache)
        block = block_length or nld.config.block_size
        limits = Limits(400, max_tokens, streaming=True, max_image_bytes=64 * 1024 * 1024,
                        max_image_pixels=64 * 1024 * 1024)
        nld.prompts.limit_images(limits.max_image_bytes, limits.max_image_pixels)
        texts = prompts(n_prompts, tasks)
        results: dict = {"model": what, "threads": threads, "image_size": list(size), "stall_size": list(big),
                         "prefix_cache": prefix_cache,
                         "max_tokens": max_tokens, "block_length": block, "stall": [], "load": {}, "ttft": {}}

        for rep in range(2 if "stall" in sections else 0):  # interleaved: the scheduler thread, then the worker, twice
            print(f"1. the stall: a {big[0]}x{big[1]} image while a text request streams", file=sys.stderr)
            for workers in (0, 1):
                results["stall"].append(stall(nld, limits, workers, big, block, seed=100 + 2 * rep + workers))
        if "load" not in sections and "ttft" not in sections:
            return report(results, what, size, big, threads, max_tokens, block, max_batch, json_out)

        print("2. load: image and text requests, in-process and served", file=sys.stderr)
        seeds = iter(range(1000, 100000))

        def jobs(kind: str, n: int) -> list[dict]:
            return [request_fields(texts[i % len(texts)], image_url(*size, next(seeds)) if kind == "image" else None,
                                   "linear_spec", max_tokens, block) for i in range(n)]

        def in_process(scheduler):
            def one(fields: dict) -> tuple[float, float, int]:
                start = time.perf_counter()
                sink = submit(scheduler, nld, limits, fields)
                sink.event.wait()
                if sink.failure:
                    raise RuntimeError(sink.failure)
                return sink.times[-1] - start, sink.times[0] - start, sink.tokens[-1]
            return one

        repo = package_repository(path, Path(tmp) / "repo", ServingOptions(
            max_batch=max_batch, max_seq_len=4096, max_tokens_cap=400, torch_threads=threads,
            max_image_bytes=64 * 1024 * 1024, max_image_pixels=64 * 1024 * 1024, prefix_cache=prefix_cache))
        with TritonServer(repo) as server:
            client = GrpcClient(server.grpc_url, keep_streams=True)

            def served(fields: dict) -> tuple[float, float, int]:
                start = time.perf_counter()
                first, tokens = None, 0
                for chunk in client.stream(**{k: v for k, v in fields.items() if k != "stream"}):
                    first = first or time.perf_counter()
                    tokens = chunk.num_tokens
                return time.perf_counter() - start, first - start, tokens

            served(jobs("image", 1)[0])  # warm-up
            scheduler = Scheduler(nld)
            try:
                for c in levels if "load" in sections else ():
                    for kind in ("text", "image"):
                        n = max(n_requests, c)
                        nld.image_encoder.clear()
                        results["load"][f"{kind} {c} in-process"] = load_run(in_process(scheduler), jobs(kind, n), c)
                        results["load"][f"{kind} {c} served"] = load_run(served, jobs(kind, n), c)
                        print(f"  {kind} at concurrency {c} done", file=sys.stderr)

                print("3. time to first token: a fresh image, then the same image again", file=sys.stderr)
                for where, run in (("in-process", in_process(scheduler)), ("served", served)) if "ttft" in sections else ():
                    fresh, cached = [], []
                    for i in range(5):
                        fields = request_fields(texts[i % len(texts)], image_url(*size, next(seeds)), "linear_spec", 8,
                                                block)
                        fresh.append(run(fields)[1])
                        cached.append(run(fields)[1])
                    results["ttft"][where] = {"fresh_ms": 1e3 * statistics.mean(fresh),
                                              "cached_ms": 1e3 * statistics.mean(cached)}
            finally:
                scheduler.stop()
            client.close()
            server.stop()
    report(results, what, size, big, threads, max_tokens, block, max_batch, json_out)


def report(results: dict, what: str, size, big, threads: int, max_tokens: int, block: int, max_batch: int,
           json_out: str | None) -> None:
    print(f"\n{what}; image {size[0]}x{size[1]} per request, stall image {big[0]}x{big[1]}; {threads} torch thread(s) "
          f"per thread that computes; linear_spec, max_tokens {max_tokens}, block {block}, up to {max_batch} sequences, "
          f"prefix cache {'on' if results['prefix_cache'] else 'off'}")
    print("\n1. a text request's inter-token latency (ms per token, p50) while a large image is prepared and encoded")
    print(f"{'encoder on':22} {'before':>8} {'during':>8} {'longest gap during':>19} {'responses during':>17} "
          f"{'encode s':>9} {'image TTFT s':>13}")
    for row in results["stall"]:
        where = "the scheduler thread" if row["workers"] == 0 else "an image worker"
        print(f"{where:22} {row['before_p50_ms']:8.2f} {row['during_p50_ms']:8.2f} {row['during_max_gap_ms']:19.1f} "
              f"{row['during_responses']:17d} {row['encode_s']:9.2f} {row['image_ttft_s']:13.2f}")
    print("\n2. load (linear_spec; every image request a picture not seen before)")
    print(f"{'requests':8} {'conc':>4} {'where':>11} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'TTFT p50 ms':>12}")
    for key, row in results["load"].items():
        kind, c, where = key.split()
        print(f"{kind:8} {int(c):4d} {where:>11} {row['tokens_per_s']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
              f"{row['ttft_p50_ms']:12.1f}")
    print("\n3. time to first token, image request (mean of 5)" + (": the same request again reuses the encoded image and "
          "its prompt's KV pages" if results["prefix_cache"] else ": the same request again reuses the encoded image"))
    for where, row in results["ttft"].items():
        print(f"  {where:11} fresh image {row['fresh_ms']:8.1f} ms, the same request again {row['cached_ms']:8.1f} ms "
              f"({row['fresh_ms'] / row['cached_ms']:.1f}x)")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
