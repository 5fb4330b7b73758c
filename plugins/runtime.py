"""Load the kernel modules in this package's mode and launch `KernelSpec`s on torch tensors."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from .interpret import interpreting, mark_loaded


def int32_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-sequence or per-position metadata (int64 tokens, bool flags...) as contiguous int32."""
    return t.to(device=device, dtype=torch.int32).contiguous()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a unit one in the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel(module: str, name: str) -> Any:
    """`module.name`, importing the module with Triton's interpreter knob set to this package's mode."""
    if module not in sys.modules:
        import triton

        interpret = interpreting()
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            importlib.import_module(module)
        mark_loaded(interpret)
    return getattr(sys.modules[module], name)


def launch(spec, grid: tuple[Any, ...], values: dict[str, Any], device_type: str) -> None:
    """Run `spec` with its runtime arguments taken from `values` in the spec's order and its constexprs
    and options from the spec, so the torch path runs exactly the variant that AOT and TensorRT build."""
    if device_type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{spec.name} got {device_type} tensors: without a GPU, call "
            "nld_trt.plugins.interpret.use_interpreter() first"
        )
    fn = kernel(spec.module, spec.name)
    args = [values[name] for name in spec.runtime_args]
    fn[grid](*args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
