#!/usr/bin/env bash
# Quantize a Nemotron-Labs-Diffusion release with NVIDIA ModelOpt, calibrated on causal and block-diffusion
# passes, then compared with the original (accuracy, logit agreement, TPF of dlm and linear_spec, against the
# recipe's gates). scripts/quantize_fp8.sh and scripts/quantize_int4_awq.sh call this with their format.
#
#   scripts/quantize_release.sh QFORMAT SIZE CHECKPOINT_DIR [OUTPUT_DIR] [extra `nld-trt quantize` options...]
#
#   QFORMAT         fp8 (W8A8 E4M3 + FP8 KV cache by default) | int4_awq (W4A16, group 128, BF16 KV cache)
#   SIZE            3B | 8B | 14B  (nvidia/Nemotron-Labs-Diffusion-{3B,8B,14B})
#   CHECKPOINT_DIR  a local copy, e.g. `huggingface-cli download nvidia/Nemotron-Labs-Diffusion-8B --local-dir ckpt/nld-8b`
#   OUTPUT_DIR      default: CHECKPOINT_DIR-QFORMAT
# Environment: DEVICE (default cuda when nvidia-smi works, else cpu), CALIB_DATA (JSONL `text` or
# `question`/`answer`; default: built-in GSM-style problems), EVAL_DATA (JSONL `question`/`answer`, e.g.
# GSM8K test with `#### N` answers), KV_CACHE_DTYPE (fp8 | none; default fp8 for fp8, none for int4_awq),
# PYTHON. Later options override earlier ones, so extra options can replace any default below.
set -euo pipefail
usage="usage: $0 fp8|int4_awq 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra nld-trt quantize options]"
qformat=${1:?$usage}
size=${2:?$usage}
ckpt=${3:?$usage}
shift 3
case "$qformat" in
    fp8) default_kv=fp8 ;;
    int4_awq) default_kv=none ;;
    *) echo "unknown format '$qformat': fp8 or int4_awq" >&2; exit 2 ;;
esac
out="${ckpt%/}-$qformat"
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
kv=${KV_CACHE_DTYPE:-$default_kv}
opts=(--model "$ckpt" --qformat "$qformat" --output "$out" --device "$device" "${calib[@]}" "${eval[@]}"
      --block-mix 0.5 --max-new-tokens 256 --keep-lm-head)
[[ $kv != none ]] && opts+=(--kv-cache-dtype "$kv")
[[ -n ${CALIB_DATA:-} ]] && opts+=(--calib-data "$CALIB_DATA")
[[ -n ${EVAL_DATA:-} ]] && opts+=(--eval-data "$EVAL_DATA")

# `python -m nld_trt.quant` is `nld-trt quantize`; later options override earlier ones.
exec "${PYTHON:-python}" -m nld_trt.quant "${opts[@]}" "$@"
