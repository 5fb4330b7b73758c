#!/usr/bin/env bash
# FP8 (W8A8 E4M3, per-tensor static scales) + FP8 KV cache for a Nemotron-Labs-Diffusion release; the fp8
# recipe tolerates a 2% TPF and 1-point accuracy drop. See scripts/quantize_release.sh for the options.
#
#   scripts/quantize_fp8.sh 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra `nld-trt quantize` options...]
exec "$(dirname "$0")/quantize_release.sh" fp8 "$@"
