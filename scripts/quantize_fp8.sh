#!/usr/bin/env bash
# FP8 (W8A8 E4M3, per-tensor static scales) + FP8 KV cache for a Nemotron-Labs-Diffusion release, calibrated
# with NVIDIA ModelOpt on causal and block-diffusion passes, then compared with the original (accuracy,
# logit agreement, TPF of dlm and linear_spec; the fp8 recipe tolerates a 2% TPF and 1-point accuracy drop).
#
#   scripts/quantize_fp8.sh SIZE CHECKPOINT_DIR [OUTPUT_DIR] [extra `nld-trt quantize` options...]
#
#   SIZE            3B | 8B | 14B  (nvidia/Nemotron-Labs-Diffusion-{3B,8B,14B})
#   CHECKPOINT_DIR  a local copy, e.g. `huggingface-cli download nvidia/Nemotron-Labs-Diffusion-8B --local-dir ckpt/nld-8b`
#   OUTPUT_DIR      default: CHECKPOINT_DIR-fp8
# Environment: DEVICE (default cuda when nvidia-smi works, else cpu), CALIB_DATA (JSONL `text` or
# `question`/`answer`; default: built-in GSM-style problems), EVAL_DATA (JSONL `question`/`answer`, e.g.
# GSM8K test with `#### N` answers), KV_CACHE_DTYPE (default fp8; `none` keeps a BF16 cache), PYTHON.
# Later options override earlier ones, so extra options can replace any default below.
set -euo pipefail
size=${1:?usage: $0 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra nld-trt quantize options]}
ckpt=${2:?usage: $0 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra nld-trt quantize options]}
shift 2
out="${ckpt%/}-fp8"
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
kv=${KV_CACHE_DTYPE:-fp8}
opts=(--model "$ckpt" --qformat fp8 --output "$out" --device "$device" "${calib[@]}" "${eval[@]}"
      --block-mix 0.5 --max-new-tokens 256 --keep-lm-head)
[[ $kv != none ]] && opts+=(--kv-cache-dtype "$kv")
[[ -n ${CALIB_DATA:-} ]] && opts+=(--calib-data "$CALIB_DATA")
[[ -n ${EVAL_DATA:-} ]] && opts+=(--eval-data "$EVAL_DATA")

# `python -m nld_trt.quant` is `nld-trt quantize`; later options override earlier ones.
exec "${PYTHON:-python}" -m nld_trt.quant "${opts[@]}" "$@"
