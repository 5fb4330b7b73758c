"""FP8 KV cache, emulated: keys (after RoPE) and values fake-quantized to E4M3 with one scale per layer.

An FP8 cache stores `e4m3(k / k_scale)` and attention reads it back times `k_scale`; fake-quantizing K/V
before attention gives the same numbers in any dtype, so the PyTorch executor can reproduce what a TensorRT
engine with an FP8 cache computes.

The hook: `Attention.kv_quant`, a callable `(k, v) -> (k, v)` that `Attention.forward` applies after RoPE,
before the cache write (three lines in nld_trt/model.py; see `MODEL_HAS_HOOK`). Until model.py has it,
`attach_kv_quant` falls back to wrapping the attention function nld_trt.model calls, so the K/V are
quantized after the cache read instead: fake quantization is idempotent, so the results are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import nn

from .. import model as nld_model

E4M3_MAX = 448.0
KVQuantFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# True once nld_trt/model.py's Attention.forward reads `self.kv_quant` (the hook the lead adds).
MODEL_HAS_HOOK = "kv_quant" in nld_model.Attention.forward.__code__.co_names


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


# Fallback while model.py lacks the hook ----------------------------------------------------------------
_ACTIVE: ContextVar[nn.Module | None] = ContextVar("nld_trt_kv_quant_attention", default=None)


def _install_attention_wrapper() -> None:
    """Make nld_trt.model's attention apply the running Attention module's kv_quant (idempotent)."""
    original = nld_model.attention
    if getattr(original, "_nld_kv_quant", False):
        return

    def attention(q, k, v, mask, scale):
        module = _ACTIVE.get()
        fn = getattr(module, "kv_quant", None) if module is not None else None
        if fn is not None:
            k, v = fn(k, v)
        return original(q, k, v, mask, scale)

    attention._nld_kv_quant = True  # type: ignore[attr-defined]
    nld_model.attention = attention


def _enter(module: nn.Module, args) -> None:
    module._kv_token = _ACTIVE.set(module)


def _leave(module: nn.Module, args, output) -> None:
    token = module.__dict__.pop("_kv_token", None)
    if token is not None:
        _ACTIVE.reset(token)


def attach_kv_quant(attn: nn.Module, fn: KVQuantFn | None) -> None:
    """Install `fn` as the layer's K/V quantizer (None removes it)."""
    if isinstance(fn, nn.Module) or fn is None:
        attn.kv_quant = fn
    else:  # a bound method of the module itself must not become a submodule
        object.__setattr__(attn, "kv_quant", fn)
    if MODEL_HAS_HOOK or fn is None or getattr(attn, "_kv_hooks", None):
        return
    _install_attention_wrapper()
    attn._kv_hooks = (
        attn.register_forward_pre_hook(_enter),
        attn.register_forward_hook(_leave, always_call=True),
    )
