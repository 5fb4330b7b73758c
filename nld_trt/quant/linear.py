"""Quantized linear layers that execute ModelOpt's exported tensors with their exact dequantization.

Each module holds the checkpoint's tensors under the checkpoint's own names (`weight`, `weight_scale`,
`input_scale`, `pre_quant_scale`), so `load_state_dict` maps a quantized checkpoint one to one. The weight is
dequantized once, on first use, and kept (per dtype) beside the packed tensors: dequantizing per call costs
more than the matmul on CPU. This is the reference semantics a TensorRT engine's quantized GEMMs must
reproduce, not a fast kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv import E4M3_MAX


def quantize_dequantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3 activation quantization as ONNX's and TensorRT's QuantizeLinear/DequantizeLinear
    define it: saturate(round(x / scale)) * scale. The engine graph computes exactly this, bit for bit under
    ONNX Runtime; ModelOpt's own fake quantization multiplies by 448 / amax instead, which rounds about one
    element in a million the other way."""
    s = scale.to(device=x.device, dtype=torch.float32)
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


class _DequantCache(nn.Module):
    """The dequantized weight, computed once per (device, dtype); never saved with the state dict."""

    _cached: tuple[torch.device, torch.dtype, torch.Tensor] | None = None

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_as(self, like: torch.Tensor) -> torch.Tensor:
        c = self._cached
        if c is None or c[0] != like.device or c[1] != like.dtype:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in and out of inference
                c = self._cached = (like.device, like.dtype, self.dequantized_weight().to(like.device, like.dtype))
        return c[2]

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None  # new tensors, new weight
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cached = None
        return super()._apply(fn, recurse)


class FP8Linear(_DequantCache):
    """FP8 W8A8, per tensor: y = fq(x, input_scale) @ (e4m3 weight * weight_scale)^T."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32))
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_dequantize_e4m3(x, self.input_scale), self.weight_as(x))

    def onnx_weights(self):
        """The engine graph's view: e4m3 weight and per-tensor scales, dequantized by DequantizeLinear."""
        from ..engine.onnx_graph import LinearWeights

        return LinearWeights("fp8", self.weight, weight_scale=self.weight_scale, input_scale=self.input_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 w8a8"


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> int8 [out, in]: ModelOpt packs output rows 2k (low nibble) and 2k+1 (high)."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(both >= 8, both - 16, both)


class Int4AWQLinear(_DequantCache):
    """INT4 AWQ W4A16: y = (x * pre_quant_scale) @ (int4 weight * group scale)^T.

    `pre_quant_scale` is present only where ModelOpt could not fold the AWQ smoothing into the preceding
    RMSNorm (o_proj and down_proj: their inputs come from no norm)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        pre_quant_scale: bool,
        scale_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features // 2, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // group_size, dtype=scale_dtype))
        self.pre_quant_scale: torch.Tensor | None
        if pre_quant_scale:
            self.register_buffer("pre_quant_scale", torch.empty(in_features, dtype=scale_dtype))
        else:
            self.pre_quant_scale = None

    def dequantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale.float().repeat_interleave(self.group_size, dim=1)
        return unpack_int4(self.weight).float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        return F.linear(x, self.weight_as(x))

    def onnx_weights(self):
        """The engine graph's view: int4 values [out, in], group scales along the input axis, AWQ smoothing."""
        from ..engine.onnx_graph import LinearWeights

        return LinearWeights("int4", unpack_int4(self.weight), weight_scale=self.weight_scale,
                             group_size=self.group_size, pre_quant_scale=self.pre_quant_scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 awq group {self.group_size}"
            f"{', pre_quant_scale' if self.pre_quant_scale is not None else ''}"
        )
