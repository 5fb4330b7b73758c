#!/usr/bin/env bash
# NVIDIA's aiperf against nld-trt's OpenAI-compatible API: streaming chat completions at each concurrency for
# each decoding mode (the mode is an extra body field), on evaluation-set questions, then one table.
#
#   scripts/bench_openai.sh                         # packages the embedded model, serves it, benchmarks it
#   scripts/bench_openai.sh --url http://HOST:9000 --tokenizer CHECKPOINT_DIR   # an nld-trt serve already running
#
# Options: --modes "ar dlm linear_spec"  --concurrency "1 4 16"  --requests N (per run, default 32)
#          --max-tokens N (default 64)  --out DIR (aiperf's artifacts; default a temporary directory)
# Figures are from one run on whatever machine this is: compare rows of the same run only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
aiperf="${AIPERF:-$(dirname "$python")/aiperf}"
url="" tokenizer="" modes="ar dlm linear_spec" concurrency="1 4 16" requests=32 max_tokens=64 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url="$2"; shift 2 ;;
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bench_openai.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$aiperf" ]; then
  echo "bench_openai.sh: no aiperf at $aiperf: install the test extra (the README's first command)" >&2
  exit 2
fi

work="$(mktemp -d -t nld-bench-openai-XXXXXX)"
out="${out:-$work/aiperf}"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"; wait "$server_pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$url" ]; then  # our own deployment of the embedded model, on free loopback ports
  tokenizer="${tokenizer:-$("$python" -c 'from nld_trt.runtime import default_model_path; print(default_model_path())')}"
  read -r http grpc metrics openai_port < <("$python" -c \
    'from nld_trt.serving.server import free_port; print(*(free_port() for _ in range(4)))')
  "$python" -m nld_trt.serving.cli package --output "$work/repo" --max-batch 16 --max-seq-len 1024 >/dev/null
  "$python" -m nld_trt.serving.cli serve "$work/repo" --http-port "$http" --grpc-port "$grpc" \
    --metrics-port "$metrics" --openai-port "$openai_port" > "$work/serve.log" 2>&1 &
  server_pid=$!
  url="http://127.0.0.1:$openai_port"
  for _ in $(seq 600); do
    if curl -sf "$url/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then tail -20 "$work/serve.log" >&2; exit 1; fi
    sleep 0.2
  done
  curl -sf "$url/health" >/dev/null || { echo "bench_openai.sh: the server did not become ready" >&2; exit 1; }
fi
if [ -z "$tokenizer" ]; then
  echo "bench_openai.sh: --url needs --tokenizer (the served checkpoint's directory, for aiperf's token counts)" >&2
  exit 2
fi
model="$(curl -sf "$url/v1/models" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"

# prompts: evaluation-set questions (what the embedded model answers), one aiperf single_turn line each
"$python" -c 'import json
from nld_trt.evaluate import load_task
for p in load_task("gsm_synth")[:256]:
    print(json.dumps({"text": p.question}))' > "$work/prompts.jsonl"

for mode in $modes; do
  for c in $concurrency; do
    echo "aiperf: mode $mode, concurrency $c, $requests requests" >&2
    "$aiperf" profile --model "$model" --url "$url" --endpoint-type chat --streaming \
      --tokenizer "$tokenizer" --use-server-token-count \
      --input-file "$work/prompts.jsonl" --custom-dataset-type single_turn \
      --extra-inputs "mode:$mode" --extra-inputs "max_tokens:$max_tokens" \
      --concurrency "$c" --request-count "$requests" --warmup-request-count "$c" \
      --output-artifact-dir "$out/$mode-c$c" --ui-type none > "$work/aiperf-$mode-c$c.log" 2>&1 \
      || { tail -30 "$work/aiperf-$mode-c$c.log" >&2; exit 1; }
  done
done

"$python" - "$out" $modes -- $concurrency <<'EOF'
import json, sys
from pathlib import Path

out, args = Path(sys.argv[1]), sys.argv[2:]
modes, concurrency = args[:args.index("--")], args[args.index("--") + 1:]
print("aiperf against the nld-trt OpenAI API (streaming chat completions)")
head = ("mode", "conc", "requests", "errors", "req/s", "out tok/s", "latency p50 ms", "latency p99 ms",
        "TTFT p50 ms", "ITL avg ms")
rows = []
for mode in modes:
    for c in concurrency:
        d = json.loads((out / f"{mode}-c{c}" / "profile_export_aiperf.json").read_text())
        metric = lambda name, stat="avg": (d.get(name) or {}).get(stat)
        errors = sum(e.get("count", 0) for e in d.get("error_summary") or [])
        rows.append((mode, c, f"{metric('request_count'):.0f}", str(errors), f"{metric('request_throughput'):.2f}",
                     f"{metric('output_token_throughput'):.1f}", f"{metric('request_latency', 'p50'):.0f}",
                     f"{metric('request_latency', 'p99'):.0f}", f"{metric('time_to_first_token', 'p50'):.0f}",
                     f"{metric('inter_token_latency') or 0:.2f}"))
widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
print("-+-".join("-" * w for w in widths))
for r in rows:
    print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
EOF
