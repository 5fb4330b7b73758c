#!/usr/bin/env bash
# The checks that need a GPU, in one run (a lent GPU host: CUDA torch, triton; no TensorRT needed):
#   1. the Triton kernels natively: timings vs SDPA and flex_attention, bandwidth, max error vs SDPA;
#   2. the PyTorch executor at a release's size (random weights, bf16): CUDA-graph passes vs eager kernels vs
#      the reference path at batch 1/8/32; the 1-token pass vs the weight-read bound, the 32-token block pass
#      vs the 1-token pass, and transformers' static cache + torch.compile per ar token on the same GPU;
#   3. the CUDA-graph tests of the suite (skipped on machines without a GPU);
#   4. the decoding loops on CUDA with the embedded model (eager kernels and CUDA graphs): every mode's
#      tokens vs the CPU run;
#   5. bench_modes on CUDA: every mode, eager vs CUDA graphs vs transformers generate(), ratios from one run.
# Prints everything; record the figures with the GPU's name in the issue notes and the README.
#
#   scripts/gpu_checks.sh [SHAPE (default 8B)]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
shape=${1:-8B}
$py - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_checks.sh needs a CUDA GPU and the CUDA build of torch (torch.cuda.is_available() is False here)")
import triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY
echo "== 1. kernels"
$py scripts/bench_kernels.py
echo "== 2. PyTorch executor, $shape, random weights, bf16"
$py scripts/bench_executor.py --shape "$shape" --device cuda --batches 1,8,32 --context 1024 --block 32
echo "== 3. CUDA-graph tests"
$py -m pytest -q tests/test_compiled_forward.py -k cuda_graphs
echo "== 4. decoding on CUDA vs CPU, embedded model"
$py - <<'PY'
import nld_trt
from nld_trt.evaluate import load_task

questions = [p.question for p in load_task("gsm_synth")[:16]]
cpu = nld_trt.load(max_batch=16, max_seq_len=512)
for compile in (False, True):
    gpu = nld_trt.load(device="cuda", dtype="float32", max_batch=16, max_seq_len=512, compile=compile)
    for mode in ("ar", "dlm", "linear_spec"):
        a = [r.token_ids for r in cpu.generate(questions, mode=mode, max_new_tokens=96)]
        b = [r.token_ids for r in gpu.generate(questions, mode=mode, max_new_tokens=96)]
        path = "CUDA graphs" if compile else "eager"
        print(f"{mode}: CUDA (float32, Triton kernels, {path}) tokens equal to CPU on "
              f"{sum(x == y for x, y in zip(a, b))}/{len(a)}")
PY
echo "== 5. bench_modes on CUDA, embedded model"
$py scripts/bench_modes.py --device cuda --prompts 16 --max-new-tokens 128
