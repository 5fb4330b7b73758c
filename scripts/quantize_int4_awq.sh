#!/usr/bin/env bash
# INT4 AWQ (W4A16: signed 4-bit weights, one scale per 128 inputs, awq_lite smoothing) for a
# Nemotron-Labs-Diffusion release; the int4_awq recipe tolerates a 5% TPF and 3-point accuracy drop. See
# scripts/quantize_release.sh for the options.
#
#   scripts/quantize_int4_awq.sh 3B|8B|14B CHECKPOINT_DIR [OUTPUT_DIR] [extra `nld-trt quantize` options...]
exec "$(dirname "$0")/quantize_release.sh" int4_awq "$@"
