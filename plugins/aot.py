"""Ahead-of-time compilation of the plugin kernels to PTX and cubin, with no GPU needed.

Each plugin's plain-Python launch logic builds `KernelSpec`s; they are compiled here for the test matrix
(sm_80, sm_89, sm_90) and, on a GPU host, by the TensorRT `aot_impl` for the build GPU, in a process where
this package's kernels are not interpreted (see plugins.interpret). `check_launchable` refuses kernels the
TensorRT AOT launcher cannot run: TensorRT passes (inputs, int32 extras, outputs) and nulls for Triton's two
trailing scratch pointers, so a kernel must need no scratch, one CTA per program, no cluster/cooperative/PDL
launch.
"""

from __future__ import annotations

import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .runtime import kernel
from .spec import KernelSpec

ARCHS = (80, 89, 90)
# PTX ISA 8.1 (CUDA 12.1, drivers >= 530): the oldest that has sm_90a and the FP8 conversions on sm_89.
# Triton's default follows its bundled ptxas (PTX 9.x), which older drivers and CUDA 13.0 tools reject.
PTX_VERSION = 81
TRT_MAX_SHARED = 48 * 1024  # dynamic shared memory a launch may use without an opt-in attribute


def jit_function(spec: KernelSpec):
    """The kernel as a JITFunction; an interpreting process cannot compile (see plugins.interpret)."""
    fn = kernel(spec.module, spec.name)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs a process where Triton is not interpreting")
    return fn


def compile_spec(spec: KernelSpec, arch: int, ptx_version: int = PTX_VERSION):
    """triton.compile for `sm_<arch>`; returns Triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata)."""
    if arch < spec.min_arch:
        raise ValueError(f"{spec.name}: this variant needs sm_{spec.min_arch} or newer, not sm_{arch}")
    fn = jit_function(spec)
    if list(spec.signature) != list(fn.arg_names):
        raise ValueError(f"{spec.name}: signature {list(spec.signature)} != kernel parameters {fn.arg_names}")
    src = ASTSource(fn, spec.signature, spec.constexprs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "ptx_version": ptx_version}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    check_launchable(compiled, spec)
    return compiled


def ptx_params(ptx: str) -> list[str]:
    """The .param declarations of the PTX entry, in order."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError("no .entry in PTX")
    return re.findall(r"\.param\s+\.(\w+)", entry.group(1))


def check_launchable(compiled, spec: KernelSpec) -> None:
    """Raise if TensorRT's AOT launcher could not run this kernel (see the module docstring)."""
    md = compiled.metadata
    problems = []
    if md.global_scratch_size or md.profile_scratch_size:
        problems.append(f"needs scratch memory ({md.global_scratch_size}, {md.profile_scratch_size} bytes)")
    if md.num_ctas != 1 or md.launch_cooperative_grid or md.launch_pdl or md.tensordesc_meta:
        problems.append("needs a cluster, cooperative, PDL or tensor-descriptor launch")
    if md.shared > TRT_MAX_SHARED:
        problems.append(f"uses {md.shared} bytes of shared memory (> {TRT_MAX_SHARED})")
    params = ptx_params(compiled.asm["ptx"])
    if len(params) != len(spec.runtime_args) + 2:  # + global_scratch, profile_scratch
        problems.append(f"PTX has {len(params)} params, expected {len(spec.runtime_args)} + 2 scratch pointers")
    if problems:
        raise ValueError(f"{spec.name}: " + "; ".join(problems))
