"""KV-aware routing against round-robin through NVIDIA Dynamo, on multi-turn chats: prefix-cache hit rates and
time to first token.

One `nld-trt cluster` of the embedded model (N tritonservers and workers) with two Dynamo frontends on the same
workers, one routing with `--router-mode kv`, one round-robin. Each frontend gets its own set of conversations (a
distinct long system prompt each, so no two conversations share more than the template's first tokens), turn by
turn, `--concurrency` conversations at a time; every turn resends the conversation so far, as chat clients do.
Printed per router: the prompt tokens the models found in their prefix caches over those they looked up (their
own counters, summed over the tritonservers), Dynamo's router estimate (its kv_hit_rate histogram, KV frontend
only), the mean and median time to first token of the turns after the first, and requests per second. Hit rates
do not depend on the machine's speed; times do (the figures are from one run: compare rows of one run).

    .venv/bin/python scripts/bench_dynamo_routing.py [--workers 2] [--conversations 16] [--turns 4]
        [--concurrency 4] [--max-tokens 16] [--mode ar]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nld_trt.serving.dynamo.cluster import Cluster, http_json  # noqa: E402
from nld_trt.serving.package import ServingOptions, package_repository  # noqa: E402
from nld_trt.serving.server import free_port  # noqa: E402


def metric_total(url: str, name: str, where: str = "") -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and where in line and not line.startswith("#"))


def model_counters(cluster: Cluster) -> tuple[float, float]:
    urls = [s.metrics_url for s in cluster.servers]
    return (sum(metric_total(u, "nld_prefix_cache_hits_total{", 'model="nld"') for u in urls),
            sum(metric_total(u, "nld_prefix_cache_queries_total{", 'model="nld"') for u in urls))


def system_prompt(i: int) -> str:
    items = ", ".join(f"item{(i * 13 + k) % 97} costs {(i + k) % 9 + 1} dollars" for k in range(16))
    return f"Shop {i}. Prices: {items}. Answer with one number."


def conversation(base_url: str, i: int, turns: int, max_tokens: int, mode: str, ttfts: list[float]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "system", "content": system_prompt(i)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"What do item{(i * 13 + turn) % 97} and item{turn} cost together?"})
        start, first, text = time.perf_counter(), None, []
        for chunk in client.chat.completions.create(model="nld", messages=messages, max_tokens=max_tokens, stream=True,
                                                    extra_body={"nvext": {"annotations": [f"nld.mode={mode}"]}}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
        messages.append({"role": "assistant", "content": "".join(text)})
        if turn:
            ttfts.append(first if first is not None else time.perf_counter() - start)


def run(cluster: Cluster, url: str, first: int, args: argparse.Namespace) -> dict:
    hits0, queries0 = model_counters(cluster)
    ttfts: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def one(i: int) -> None:
        local: list[float] = []
        conversation(url, first + i, args.turns, args.max_tokens, args.mode, local)
        with lock:
            ttfts.extend(local)

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.conversations)))
    elapsed = time.perf_counter() - start
    hits, queries = model_counters(cluster)
    return {"hit_rate": (hits - hits0) / (queries - queries0) if queries > queries0 else None,
            "ttft_mean_ms": 1e3 * statistics.mean(ttfts), "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "req_s": args.conversations * args.turns / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--mode", default="ar")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nld-bench-routing-") as tmp:
        repo = package_repository(None, Path(tmp) / "repo", ServingOptions(max_batch=8, max_seq_len=1024,
                                                                           torch_threads=1), sync_model=False)
        print(f"starting nld-trt cluster: {args.workers} tritonservers and workers, a KV-routing frontend",
              file=sys.stderr)
        with Cluster(repo, workers=args.workers, router_mode="kv", log=lambda m: print(m, file=sys.stderr)) as cluster:
            port = free_port()
            rr = subprocess.Popen([sys.executable, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port",
                                   str(port), "--discovery-backend", "file", "--router-mode", "round-robin"],
                                  env=cluster.env, stdout=open(cluster.workdir / "frontend-rr.log", "wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rr_url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if sum(i.get("endpoint") == "generate"
                               for i in http_json(f"{rr_url}/health").get("instances", [])) == args.workers:
                            break
                    except OSError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("the round-robin frontend did not see the workers")
                    time.sleep(0.2)
                for url in (cluster.url, rr_url):  # warm both paths up (first requests pay one-time costs)
                    conversation(url, 5000, 2, args.max_tokens, args.mode, [])
                results = {}
                for name, url, first in (("kv", cluster.url, 0), ("round-robin", rr_url, 1000)):
                    print(f"{name}: {args.conversations} conversations x {args.turns} turns, {args.concurrency} at a "
                          "time", file=sys.stderr)
                    results[name] = run(cluster, url, first, args)
                sums = {k: metric_total(f"{cluster.url}/metrics", f"dynamo_component_router_kv_hit_rate_{k}")
                        for k in ("sum", "count")}
                results["kv"]["router_estimate"] = sums["sum"] / sums["count"] if sums["count"] else None
            finally:
                rr.terminate()
                rr.wait(30)
    print(f"multi-turn chats through NVIDIA Dynamo, {args.workers} nld-trt workers, mode {args.mode}, "
          f"{args.conversations} conversations x {args.turns} turns, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}")
    print("| router | prefix-cache hit rate (models) | router's estimate | TTFT mean ms (turns 2+) | TTFT p50 ms | req/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
        est = "-" if r.get("router_estimate") is None else f"{r['router_estimate']:.1%}"
        print(f"| {name} | {hit} | {est} | {r['ttft_mean_ms']:.1f} | {r['ttft_p50_ms']:.1f} | {r['req_s']:.2f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
