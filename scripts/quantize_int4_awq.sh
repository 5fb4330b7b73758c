#!/usr/bin/env bash
# INT4 AWQ (W4A16: signed 4-bit weights, one scale per 128 inputs, awq_lite smoothing) for a
# Nemotron-Labs-Diffusion release, calibrated with NVIDIA ModelOpt on causal and block-diffusion passes, then
# compared with the original (the int4_awq recipe tolerates a 5% TPF and 3-point accuracy drop).
#
#   scripts/quantize_int4_awq.sh SIZE CHECKPOINT_DIR [OUTPUT_DIR] [extra `nld-trt quantize` options...]
#
#   SIZE            3B | 8B | 14B  (nvidia/Nemotron-Labs-Diffusion-{3B,8B,14B})
#   CHECKPOINT_DIR  a local copy, e.g. `huggingface-cli download nvidia/Nemotron-Labs-Diffusion-8B --local-dir ckpt/nld-8b`
#   OUTPUT_DIR      default: CHECKPOINT_DIR-int4_awq
# Environment: DEVICE, CALIB_DATA, EVAL_DATA, KV_CACHE_DTYPE (default none: W4A16 keeps a BF16 cache), PYTHON.
set -euo pipefail
size=${1:?usage: $0 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra nld-trt quantize options]}
ckpt=${2:?usage: $0 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra nld-trt quantize options]}
shift 2
out="${ckpt%/}-int4_awq"
if [[ $# -gt 0 && $1 != -* ]]; then out=$1; shift; fi

# Per release: calibration passes, tokens per pass, held-out prompts, decode batch. All three fit one
# 80 GB GPU in bfloat16 (the original and the quantized model are never resident together).
case "$size" in
    3B)  calib=(--calib-size 512 --calib-seq-len 1024) eval=(--eval-size 128 --eval-batch 32) ;;
    8B)  calib=(--calib-size 512 --calib-seq-len 1024) eval=(--eval-size 128 --eval-batch 16) ;;
    14B) calib=(--calib-size 512 --calib-seq-len 1024) eval=(--eval-size 64 --eval-batch 8) ;;
    *) echo "unknown size '$size': 3B, 8B or 14B (nvidia/Nemotron-Labs-Diffusion-$size)" >&2; exit 2 ;;
esac
[[ -f "$ckpt/config.json" ]] || { echo "$ckpt has no config.json: download the whole repository" >&2; exit 2; }

device=${DEVICE:-$(nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
[[ $device == cpu ]] && echo "warning: no GPU; a $size model calibrates slowly on CPU in float32" >&2
kv=${KV_CACHE_DTYPE:-none}
opts=(--model "$ckpt" --qformat int4_awq --output "$out" --device "$device" "${calib[@]}" "${eval[@]}"
      --block-mix 0.5 --max-new-tokens 256 --keep-lm-head)
[[ $kv != none ]] && opts+=(--kv-cache-dtype "$kv")
[[ -n ${CALIB_DATA:-} ]] && opts+=(--calib-data "$CALIB_DATA")
[[ -n ${EVAL_DATA:-} ]] && opts+=(--eval-data "$EVAL_DATA")

# `python -m nld_trt.quant` is `nld-trt quantize`; later options override earlier ones.
exec "${PYTHON:-python}" -m nld_trt.quant "${opts[@]}" "$@"
