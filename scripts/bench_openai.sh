#!/usr/bin/env bash
# NVIDIA's aiperf against nld-trt's OpenAI-compatible API: streaming chat completions at each concurrency for
# each decoding mode, on evaluation-set questions, then one table per target.
#
#   scripts/bench_openai.sh                         # packages the embedded model, serves it, benchmarks it
#   scripts/bench_openai.sh --url http://HOST:9000 --tokenizer CHECKPOINT_DIR   # an nld-trt serve already running
#   scripts/bench_openai.sh --targets "direct dynamo:1 dynamo:2"   # also through NVIDIA Dynamo (nld-trt cluster)
#
# Targets: `direct` is nld-trt serve's own OpenAI front end (the mode as an extra body field); `dynamo:N` is
# nld-trt cluster with N tritonservers and workers behind Dynamo's frontend with KV routing (the mode as an
# nvext annotation); each is started, benchmarked and stopped in turn on the same repository. With more than one
# target a last table gives each target's latency and time to first token minus the direct front end's (what
# Dynamo adds per request) and, for Dynamo targets, the prefix-cache hit rates: the router's estimate (its
# kv_hit_rate histogram) and the models' own counters (prompt tokens found in the prefix cache / looked up).
# Options: --modes "ar dlm linear_spec"  --concurrency "1 4 16"  --requests N (per run, default 32)
#          --max-tokens N (default 64)  --out DIR (aiperf's artifacts; default a temporary directory)
#          --url URL [--nvext] (a deployment already running; --nvext: a Dynamo frontend)
# Figures are from one run on whatever machine this is: compare rows of the same run only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
aiperf="${AIPERF:-$(dirname "$python")/aiperf}"
url="" tokenizer="" modes="ar dlm linear_spec" concurrency="1 4 16" requests=32 max_tokens=64 out="" targets="direct"
nvext=0
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url="$2"; shift 2 ;;
    --nvext) nvext=1; shift ;;
    --targets) targets="$2"; shift 2 ;;
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench_openai.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$aiperf" ]; then
  echo "bench_openai.sh: no aiperf at $aiperf: install the test extra (the README's first command)" >&2
  exit 2
fi

work="$(mktemp -d -t nld-bench-openai-XXXXXX)"
out="${out:-$work/aiperf}"
server_pid="" pids=()
declare -A urls nvexts
stop_servers() {
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
  done
  pids=()
}
cleanup() { stop_servers; rm -rf "$work"; }
trap cleanup EXIT

wait_ready() {  # $1: URL that answers when ready, $2: log to show on failure
  for _ in $(seq 1500); do
    if curl -sf "$1" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then tail -20 "$2" >&2; exit 1; fi
    sleep 0.2
  done
  echo "bench_openai.sh: $1 did not become ready" >&2; exit 1
}

# start one target: its URL and how it takes the mode go into urls/nvexts
start_target() {
  local target="$1"
  if [ ! -d "$work/repo" ]; then
    "$python" -m nld_trt.serving.cli package --output "$work/repo" --max-batch 16 --max-seq-len 1024 >/dev/null
  fi
  case "$target" in
    direct)
      read -r http grpc metrics openai_port < <("$python" -c \
        'from nld_trt.serving.server import free_port; print(*(free_port() for _ in range(4)))')
      "$python" -m nld_trt.serving.cli serve "$work/repo" --http-port "$http" --grpc-port "$grpc" \
        --metrics-port "$metrics" --openai-port "$openai_port" > "$work/serve.log" 2>&1 &
      server_pid=$!
      url="http://127.0.0.1:$openai_port"; nvext=0
      wait_ready "$url/health" "$work/serve.log" ;;
    dynamo:*)
      local n="${target#dynamo:}" port
      port="$("$python" -c 'from nld_trt.serving.server import free_port; print(free_port())')"
      rm -rf "$work/$target"
      "$python" -m nld_trt.cli cluster "$work/repo" --workers "$n" --router-mode kv --http-port "$port" \
        --log-dir "$work/$target" > "$work/$target.log" 2>&1 &
      server_pid=$!
      url="http://127.0.0.1:$port"; nvext=1
      for _ in $(seq 3000); do
        [ -f "$work/$target/cluster.json" ] && break
        if ! kill -0 "$server_pid" 2>/dev/null; then tail -20 "$work/$target.log" >&2; exit 1; fi
        sleep 0.2
      done
      wait_ready "$url/v1/models" "$work/$target.log" ;;
    *) echo "bench_openai.sh: unknown target $target (direct or dynamo:N)" >&2; exit 2 ;;
  esac
  pids+=("$server_pid"); urls[$target]="$url"; nvexts[$target]="$nvext"
}

# the prefix-cache figures of a Dynamo target: the router's estimate and the models' counters
hit_rates() {
  "$python" - "${urls[$1]}" "$work/$1/cluster.json" > "$out/$1/hits.json" <<'PY'
import json, re, sys, urllib.request
url, cluster = sys.argv[1], json.load(open(sys.argv[2]))
def scrape(u):
    return urllib.request.urlopen(u, timeout=10).read().decode().splitlines()
def total(lines, name, where=""):
    return sum(float(l.rsplit(" ", 1)[1]) for l in lines if l.startswith(name) and where in l and not l.startswith("#"))
front = scrape(url + "/metrics")
router = {k: total(front, f"dynamo_component_router_kv_hit_rate_{k}") for k in ("sum", "count")}
models = [scrape(w["metrics"]) for w in cluster["workers"]]
hits = sum(total(m, "nld_prefix_cache_hits_total{", 'model="nld"') for m in models)
queries = sum(total(m, "nld_prefix_cache_queries_total{", 'model="nld"') for m in models)
print(json.dumps({"router": router["sum"] / router["count"] if router["count"] else None,
                  "model": hits / queries if queries else None}))
PY
}

if [ -n "$url" ]; then  # an already running deployment
  if [ -z "$tokenizer" ]; then
    echo "bench_openai.sh: --url needs --tokenizer (the served checkpoint's directory, for aiperf's token counts)" >&2
    exit 2
  fi
  targets="given"
fi
tokenizer="${tokenizer:-$("$python" -c 'from nld_trt.runtime import default_model_path; print(default_model_path())')}"

# prompts: evaluation-set questions (what the embedded model answers), one aiperf single_turn line each
"$python" -c 'import json
from nld_trt.evaluate import load_task
for p in load_task("gsm_synth")[:256]:
    print(json.dumps({"text": p.question}))' > "$work/prompts.jsonl"

# every target up at once, then each (mode, concurrency) run on each target in turn: a machine whose load drifts
# during the benchmark shifts all targets alike
for target in $targets; do
  if [ "$target" = "given" ]; then urls[given]="$url"; nvexts[given]="$nvext"; else start_target "$target"; fi
  mkdir -p "$out/$target"
done
for mode in $modes; do
  for c in $concurrency; do
    for target in $targets; do
      url="${urls[$target]}"
      model="$(curl -sf "$url/v1/models" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"
      if [ "${nvexts[$target]}" = 1 ]; then
        mode_input="{\"nvext\": {\"annotations\": [\"nld.mode=$mode\"]}}"
      else
        mode_input="mode:$mode"
      fi
      echo "aiperf: $target, mode $mode, concurrency $c, $requests requests" >&2
      "$aiperf" profile --model "$model" --url "$url" --endpoint-type chat --streaming \
        --tokenizer "$tokenizer" --use-server-token-count \
        --input-file "$work/prompts.jsonl" --custom-dataset-type single_turn \
        --extra-inputs "$mode_input" --extra-inputs "max_tokens:$max_tokens" \
        --concurrency "$c" --request-count "$requests" --warmup-request-count "$c" \
        --output-artifact-dir "$out/$target/$mode-c$c" --ui-type none > "$work/aiperf.log" 2>&1 \
        || { tail -30 "$work/aiperf.log" >&2; exit 1; }
    done
  done
done
for target in $targets; do
  if [ "${target#dynamo:}" != "$target" ]; then hit_rates "$target"; fi
done
stop_servers

"$python" - "$out" "$targets" $modes -- $concurrency <<'EOF'
import json, sys
from pathlib import Path

out, targets, args = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
modes, concurrency = args[:args.index("--")], args[args.index("--") + 1:]
NAMES = {"direct": "the nld-trt OpenAI API", "given": "the nld-trt OpenAI API"}


def table(head, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))


runs = {}
for target in targets:
    name = NAMES.get(target) or f"NVIDIA Dynamo's frontend with {target.split(':')[1]} nld-trt worker(s), KV routing"
    print(f"aiperf against {name} (streaming chat completions)")
    head = ("mode", "conc", "requests", "errors", "req/s", "out tok/s", "latency p50 ms", "latency p99 ms",
            "TTFT p50 ms", "ITL avg ms")
    rows = []
    for mode in modes:
        for c in concurrency:
            d = json.loads((out / target / f"{mode}-c{c}" / "profile_export_aiperf.json").read_text())
            metric = lambda name, stat="avg", d=d: (d.get(name) or {}).get(stat)
            runs[target, mode, c] = metric
            errors = sum(e.get("count", 0) for e in d.get("error_summary") or [])
            rows.append((mode, c, f"{metric('request_count'):.0f}", str(errors), f"{metric('request_throughput'):.2f}",
                         f"{metric('output_token_throughput'):.1f}", f"{metric('request_latency', 'p50'):.0f}",
                         f"{metric('request_latency', 'p99'):.0f}", f"{metric('time_to_first_token', 'p50'):.0f}",
                         f"{metric('inter_token_latency') or 0:.2f}"))
    table(head, rows)
    print()
if len(targets) > 1 and "direct" in targets:
    print("each target against the direct front end (same mode and concurrency): throughput ratio, p50 latency and "
          "p50 TTFT minus the direct ones; prefix-cache hit rate over the target's runs")
    rows = []
    shown = lambda v: "-" if v is None else f"{v:.1%}"
    for target in (t for t in targets if t != "direct"):
        hits = json.loads((out / target / "hits.json").read_text()) if (out / target / "hits.json").is_file() else {}
        for mode in modes:
            for c in concurrency:
                t, d = runs[target, mode, c], runs["direct", mode, c]
                rows.append((target, mode, c, f"{t('request_throughput') / d('request_throughput'):.2f}",
                             f"{t('request_latency', 'p50') - d('request_latency', 'p50'):+.1f}",
                             f"{t('time_to_first_token', 'p50') - d('time_to_first_token', 'p50'):+.1f}",
                             shown(hits.get("router")), shown(hits.get("model"))))
    table(("target", "mode", "conc", "req/s vs direct", "latency p50 +ms", "TTFT p50 +ms", "hit rate (router)",
           "hit rate (model)"), rows)
EOF
