"""FP8 KV cache: keys (after RoPE) and values quantized to E4M3 with one scale per layer.

An FP8 cache stores `e4m3(k / k_scale)` and attention reads it back times `k_scale`. Passes against the
cache do exactly that: the checkpoint's scales become the cache layout's (`kv_scales` -> nld_trt/kv), which
quantizes when K/V are written, in the reference path, the Triton kernels and the engine graph. Cache-free
passes (calibration, comparisons) fake-quantize instead, through the `Attention.kv_quant` hook
(`attach_kv_quant`): the same numbers in any dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import NLDError
from ..kv.layout import KVScales

E4M3_MAX = 448.0
KVQuantFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def fake_quant_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3 quantize-dequantize, e4m3(x / scale) * scale, in x's dtype.

    Computed in the operation order of ModelOpt's own fake quantization (x * (448 / amax), saturate, cast,
    times the reciprocal, with amax = 448 * scale), so a loaded checkpoint reproduces the calibrated model
    bit for bit instead of differing by a rounding flip now and then."""
    amax = scale.to(device=x.device, dtype=torch.float32) * E4M3_MAX
    q = E4M3_MAX / amax
    y = (x.float() * q).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (y.float() * (1.0 / q)).to(x.dtype)


class FP8KVQuant(nn.Module):
    """One layer's FP8 KV-cache scales (`k_proj.k_scale`, `v_proj.v_scale` in the checkpoint)."""

    def __init__(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        super().__init__()
        # Not persistent: the checkpoint names them k_proj.k_scale / v_proj.v_scale, the loader reads them.
        self.register_buffer("k_scale", k_scale.detach().float().reshape(()), persistent=False)
        self.register_buffer("v_scale", v_scale.detach().float().reshape(()), persistent=False)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fake_quant_e4m3(k, self.k_scale), fake_quant_e4m3(v, self.v_scale)


def attach_kv_quant(attn: nn.Module, fn: KVQuantFn | None) -> None:
    """Install `fn` as the layer's K/V quantizer for cache-free passes (None removes it)."""
    if isinstance(fn, nn.Module) or fn is None:
        attn.kv_quant = fn
    else:  # a bound method of the module itself must not become a submodule
        object.__setattr__(attn, "kv_quant", fn)


def kv_scales(model: nn.Module) -> tuple[KVScales, ...] | None:
    """The FP8 KV-cache scales of a loaded FP8-KV checkpoint, one pair per layer (None: not quantized), for
    the cache's layout (nld_trt/kv/layout.py), which applies them when K/V are written."""
    quants = [layer.self_attn.kv_quant for layer in model.encoder.layers]
    if all(q is None for q in quants):
        return None
    if not all(isinstance(q, FP8KVQuant) for q in quants):
        raise NLDError("an FP8 KV cache needs FP8 k/v scales on every layer")
    return tuple(KVScales.from_scales(float(q.k_scale), float(q.v_scale)) for q in quants)
