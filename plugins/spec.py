"""What a kernel variant is, as plain data (no triton import), so launch logic and tests need no compiler.

A `KernelSpec` is everything `triton.compile` needs besides the target; each plugin's launch.py builds
them, plugins.aot compiles them, plugins.runtime launches them on torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Sequence

FP8_MIN_ARCH = 89  # Triton has no e4m3 (fp8e4nv) before Ada


@dataclass(frozen=True)
class KernelSpec:
    """One compilable kernel variant: kernel module and name, Triton signature, constexprs, options."""

    module: str  # dotted kernel module, e.g. "nld_trt.plugins.block_attention.kernels"
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    min_arch: int = 80

    @property
    def runtime_args(self) -> list[str]:
        """Kernel parameters that stay in the PTX entry (the launcher must pass exactly these, in order)."""
        return [n for n, t in self.signature.items() if t != "constexpr"]


def aot_signature(
    inputs: dict[str, str],
    ints: Sequence[str],
    floats: Sequence[str],
    outputs: dict[str, str],
    constexprs: Sequence[str],
    specialized: Collection[str] = (),
) -> dict[str, str]:
    """A Triton signature in TensorRT's AOT order: input pointers ({name: element type}), int32 scalars,
    fp32 scalars (constexpr when specialized: TensorRT passes no floats), output pointers, constexprs.
    The kernels declare their parameters in this order."""
    sig = {name: f"*{t}" for name, t in inputs.items()}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" if name in specialized else "fp32" for name in floats})
    sig.update({name: f"*{t}" for name, t in outputs.items()})
    sig.update({name: "constexpr" for name in constexprs})
    return sig
