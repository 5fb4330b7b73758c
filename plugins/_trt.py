"""What every TensorRT wrapper needs: the lazy import with a clear error, the build GPU's arch, constants
out of shape expressions, and the (kernel name, PTX, launch params, extra args) tuple of an aot_impl."""

from __future__ import annotations

from typing import Any, Sequence

from .spec import KernelSpec

MIN_TENSORRT = (10, 9)
INSTALL_HINT = (
    "the nld:: TensorRT plugins need TensorRT >= 10.9 with its Python plugin API (tensorrt.plugin, "
    "aot_impl); install it on a GPU host from NVIDIA's package index, e.g. `pip install tensorrt-cu12` "
    "(CUDA 12) or `pip install tensorrt-cu13` (CUDA 13)"
)


def tensorrt_plugin() -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin), or a RuntimeError saying what to install."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({exc})") from exc
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT or not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"found TensorRT {trt.__version__}: {INSTALL_HINT}")
    return trt, trtp


def build_arch() -> int:
    """Compute capability of the GPU the engine is built on (TensorRT engines are per-GPU anyway)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("building the nld:: plugins' kernels needs the CUDA GPU the engine targets")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def constant(expr: Any, what: str) -> int:
    """An int from a shape expression that must be static when the engine is built (e.g. head_dim)."""
    if isinstance(expr, int):
        return expr
    if getattr(expr, "is_constant", False):
        return int(expr.constant_value)
    raise ValueError(f"{what} must be a static dimension of the network")


def aot_result(trtp: Any, spec: KernelSpec, grid: Sequence[Any], extras: Sequence[Any]) -> tuple:
    """Compile `spec` for the build GPU and return what an aot_impl returns. `extras` are the int32
    scalars in the kernel's order (TensorRT passes inputs, these, then outputs)."""
    from .aot import compile_spec  # imports triton: only where an engine is built

    compiled = compile_spec(spec, build_arch())
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = (*grid, 1, 1)[:3]
    params.block_x = compiled.metadata.num_warps * 32
    params.shared_mem = compiled.metadata.shared
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in extras])
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), params, extra_args
