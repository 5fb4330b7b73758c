#!/usr/bin/env bash
# The checks that need a GPU, in one run (a lent GPU host: CUDA torch, triton; no TensorRT needed):
#   1. the Triton kernels natively: timings vs SDPA and flex_attention, bandwidth, max error vs SDPA;
#   2. the PyTorch executor at a release's size (random weights), fused kernels vs the reference path;
#   3. the decoding loops on CUDA with the embedded model: every mode's tokens vs the CPU run.
# Prints everything; record the figures with the GPU's name in the issue notes.
#
#   scripts/gpu_checks.sh [SHAPE (default 8B)]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
shape=${1:-8B}
$py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
echo "== 1. kernels"
$py scripts/bench_kernels.py
echo "== 2. PyTorch executor, $shape, random weights"
$py scripts/bench_executor.py --shape "$shape" --device cuda --batches 1,8,32 --context 1024 --block 32
echo "== 3. decoding on CUDA vs CPU, embedded model"
$py - <<'PY'
import nld_trt
from nld_trt.evaluate import load_task

questions = [p.question for p in load_task("gsm_synth")[:16]]
cpu = nld_trt.load(max_batch=16, max_seq_len=512)
gpu = nld_trt.load(device="cuda", dtype="float32", max_batch=16, max_seq_len=512)
for mode in ("ar", "dlm", "linear_spec"):
    a = [r.token_ids for r in cpu.generate(questions, mode=mode, max_new_tokens=96)]
    b = [r.token_ids for r in gpu.generate(questions, mode=mode, max_new_tokens=96)]
    print(f"{mode}: CUDA (float32, Triton kernels) tokens equal to CPU on {sum(x == y for x, y in zip(a, b))}/{len(a)}")
PY
