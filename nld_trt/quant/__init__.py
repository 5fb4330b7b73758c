"""Post-training quantization of NLD checkpoints (FP8 W8A8, INT4 AWQ W4A16) and loading the results.

Two halves with different dependencies:
- making a quantized checkpoint (`pipeline`, `calibrate`, `export`, `calib_data`, `compare`, `cli`) uses
  NVIDIA ModelOpt for calibration and for its unified Hugging Face export;
- running one (`loader`, `linear`, `kv`) needs only PyTorch: the runtime reads ModelOpt's tensors itself and
  executes them with the exact dequantization semantics, so serving never imports ModelOpt.
"""

from __future__ import annotations

from typing import Any

from ..errors import NLDError


class QuantizationError(NLDError):
    """A quantization request cannot be carried out (bad format, calibration data, dimensions...)."""


def is_quantized(config: Any) -> bool:
    """Whether an NLDConfig describes a quantized checkpoint (its config.json has quantization_config)."""
    return getattr(config, "quantization_config", None) is not None


__all__ = ["QuantizationError", "is_quantized"]
