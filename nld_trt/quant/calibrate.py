"""Calibration with NVIDIA ModelOpt: the NLD model with the few extras ModelOpt reads, KV-cache quantizers
for NLD's attention, and the forward loop over causal and block passes.

ModelOpt inserts KV-cache quantizers only into transformers models, so NLD's `Attention` is registered
here with `k_bmm_quantizer` / `v_bmm_quantizer` (ModelOpt's names, which its export turns into
`k_proj.k_scale` / `v_proj.v_scale`), applied to K after RoPE and to V through the `kv_quant` hook.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..model import Attention, NLDModel
from .calib_data import CalibPass
from .kv import attach_kv_quant


class CalibrationModel(NLDModel):
    """NLDModel plus what ModelOpt's calibration and unified export expect of a Hugging Face model: a
    `device`, a forward callable with token ids only (export probes which linears share an input), and
    `save_pretrained` writing NLD's release layout."""

    export_config: dict[str, Any] | None = None  # the raw config.json written on export
    export_dtype: torch.dtype | None = None  # the dtype of the unquantized tensors on export
    float_names: frozenset[str] = frozenset()  # the release layout's own tensors (not the scales)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, tokens, positions=None, mask=None, step=None, lora_rows=None, inputs_embeds=None, **_: Any):
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return super().forward(tokens, positions, mask, step, lora_rows, inputs_embeds=inputs_embeds)

    def save_pretrained(self, save_directory, state_dict=None, max_shard_size="5GB", **_: Any) -> None:
        from ..checkpoint import write_safetensors

        directory = Path(save_directory)
        tensors = state_dict if state_dict is not None else self.state_dict()
        if self.export_dtype is not None:  # ModelOpt casts only what it quantizes; the rest follows the release
            tensors = {
                k: v.to(self.export_dtype)
                if v.dtype == torch.float64 or (k in self.float_names and v.dtype.is_floating_point and v.itemsize > 1)
                else v
                for k, v in tensors.items()
            }
        write_safetensors(directory, tensors, max_shard_size)
        (directory / "config.json").write_text(json.dumps(self.export_config, indent=2) + "\n")


def _register_attention() -> None:
    """Give ModelOpt a quantized twin of NLD's Attention (once per process)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer

    if QuantModuleRegistry.get(Attention) is not None:
        return

    class QuantNLDAttention(Attention):
        def _setup(self) -> None:
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()
            attach_kv_quant(self, self._quantize_kv)

        def _quantize_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.k_bmm_quantizer(k), self.v_bmm_quantizer(v)

    mtq.register(original_cls=Attention, quantized_cls=QuantNLDAttention)


def build_calibration_model(config, tensors: dict[str, torch.Tensor], lora, device, dtype) -> CalibrationModel:
    """The checkpoint's weights in a CalibrationModel (no random initialisation), LoRA drafter installed."""
    from ..runtime import build_model

    model = build_model(config, tensors, device, dtype)
    model.__class__ = CalibrationModel  # same modules and parameters, plus the ModelOpt extras
    if lora is not None:
        model.set_lora(lora.layers, lora.scale)
    return model


def forward_loop(passes: Sequence[CalibPass], progress=None):
    """The callable ModelOpt runs (possibly several times, e.g. awq_lite's cache and search passes)."""

    def loop(model: CalibrationModel) -> None:
        device = model.device
        with torch.no_grad():
            for i, p in enumerate(passes):
                tokens, positions, mask, lora_rows = p.inputs(device)
                model(tokens, positions, mask, None, lora_rows, inputs_embeds=p.embedded(model, tokens))
                if progress is not None:
                    progress(i + 1, len(passes))

    return loop


def calibrate(
    model: CalibrationModel, quant_config: dict, passes: Sequence[CalibPass], progress=None
) -> CalibrationModel:
    """Insert the quantizers and calibrate them in place (max calibration for FP8, awq_lite for INT4)."""
    import modelopt.torch.quantization as mtq

    _register_attention()
    with quiet():
        mtq.quantize(model, quant_config, forward_loop(passes, progress))
    return model


def quiet():
    """ModelOpt prints progress on stdout; keep the command's own output clean unless NLD_TRT_VERBOSE is set."""
    if os.environ.get("NLD_TRT_VERBOSE"):
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(io.StringIO())
