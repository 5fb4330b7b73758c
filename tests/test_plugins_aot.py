"""Ahead-of-time compilation of every plugin kernel (PTX and cubin for sm_80, sm_89, sm_90), the TensorRT
wrappers driven through a stand-in `tensorrt.plugin`, and the plain-Python shape/launch logic.

Triton is either interpreting or compiling for a whole process (see nld_trt.plugins.interpret) and the
kernel tests interpret, so compilation runs in worker subprocesses: this file run as a script
(`python tests/test_plugins_aot.py compile 0 2`, `... trt`) prints JSON that the tests below check. This
module itself imports no triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nld_trt.plugins.block_attention import launch as A
from nld_trt.plugins.shapes import cdiv, contiguous_strides
from nld_trt.plugins.spec import FP8_MIN_ARCH, KernelSpec
from nld_trt.plugins.spec_accept import launch as S

HEAD_DIM = 128
PAGE = 16
SHARDS = 2  # worker processes (this machine kind has 2 cores)
PTX_TYPE = {"i32": "u32", "fp32": "f32"}  # scalar signature type -> PTX param type; pointers are u64


def compile_matrix() -> list[tuple[str, int, KernelSpec]]:
    """Every kernel for every arch; dtype variants on sm_90 only; FP8 caches from sm_89 on."""
    scales = A.attention_scales(HEAD_DIM**-0.5, 1.0, 1.0)
    bf16 = A.attention_tactics("bf16")
    rows = []
    for arch in (80, 89, 90):
        rows += [
            ("attention bf16 tactic 1", arch,
             A.attention_spec("bf16", "bf16", HEAD_DIM, PAGE, bf16[1], specialize=scales)),
            ("attention bf16 tactic 2", arch,
             A.attention_spec("bf16", "bf16", HEAD_DIM, PAGE, bf16[2], specialize=scales)),
            ("write_kv bf16", arch, A.write_spec("bf16", "bf16", HEAD_DIM, PAGE, 32)),
            ("spec_accept bf16", arch, S.accept_spec("bf16", S.TRT_CONFIG)),
            ("dlm_select bf16", arch, S.select_spec("bf16", S.TRT_CONFIG, specialize={"threshold": 0.9})),
        ]
        if arch >= FP8_MIN_ARCH:
            rows += [
                ("attention bf16 fp8-cache", arch,
                 A.attention_spec("bf16", "fp8e4nv", HEAD_DIM, PAGE, bf16[2], specialize=scales)),
                ("write_kv bf16->fp8", arch, A.write_spec("bf16", "fp8e4nv", HEAD_DIM, PAGE, 32,
                                                          specialize=A.write_scales(20.0, 50.0))),
            ]
    fp32 = A.attention_tactics("fp32")
    rows += [
        ("attention fp16 tactic 1", 90, A.attention_spec("fp16", "fp16", HEAD_DIM, PAGE, bf16[1], specialize=scales)),
        ("attention fp32 tactic 1", 90, A.attention_spec("fp32", "fp32", HEAD_DIM, PAGE, fp32[1], specialize=scales)),
        ("attention fp32 tactic 2", 90, A.attention_spec("fp32", "fp32", HEAD_DIM, PAGE, fp32[2], specialize=scales)),
        ("attention torch-path bf16", 90, A.attention_spec("bf16", "bf16", HEAD_DIM, PAGE, bf16[2])),
        ("attention bf16 pages of 64", 90, A.attention_spec("bf16", "bf16", HEAD_DIM, 64, bf16[1], specialize=scales)),
        ("write_kv fp32", 90, A.write_spec("fp32", "fp32", HEAD_DIM, PAGE, 32)),
        ("write_kv fp32 quantized", 90, A.write_spec("fp32", "fp32", HEAD_DIM, PAGE, 32, quantize=True)),
        ("spec_accept fp32", 90, S.accept_spec("fp32", S.TRT_CONFIG)),
        ("dlm_select fp16", 90, S.select_spec("fp16", S.TRT_CONFIG, specialize={"threshold": 0.9})),
    ]
    return rows


def expected_params(spec: KernelSpec) -> list[str]:
    """PTX params the launcher must fill: the runtime args in order, then Triton's two scratch pointers."""
    types = [spec.signature[name] for name in spec.runtime_args]
    return [PTX_TYPE.get(t, "u64") for t in types] + ["u64", "u64"]


# ---------------------------------------------------------------------------------------------------------
# Worker side (a subprocess that compiles; never runs inside pytest's process)


def _compile_worker(shard: int, shards: int) -> list[dict]:
    import time
    import warnings

    warnings.filterwarnings("ignore")
    from nld_trt.plugins.aot import PTX_VERSION, compile_spec, ptx_params

    results = []
    for label, arch, spec in compile_matrix()[shard::shards]:
        start = time.time()
        row = {"label": label, "arch": arch, "expected": expected_params(spec)}
        try:
            compiled = compile_spec(spec, arch)
            ptx = compiled.asm["ptx"]
            row.update(
                ok=True, params=ptx_params(ptx), ptx_bytes=len(ptx), cubin_bytes=len(compiled.asm["cubin"]),
                elf=compiled.asm["cubin"][:4] == b"\x7fELF", shared=compiled.metadata.shared,
                target=f"sm_{arch}" + ("a" if arch >= 90 else "") in ptx,
                version=f".version {PTX_VERSION // 10}.{PTX_VERSION % 10}" in ptx,
            )
        except Exception as exc:  # reported, the test fails on it
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
        row["seconds"] = round(time.time() - start, 2)
        results.append(row)
    return results


def _install_fake_tensorrt() -> dict:
    """A stand-in for tensorrt / tensorrt.plugin with just the API the wrappers use, recording what they
    register. It checks our side of the contract (argument order, counts, shapes), not TensorRT itself."""
    import enum
    import types
    import typing

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16 FP8 INT32 INT8 BOOL")
    trtp = types.ModuleType("tensorrt.plugin")
    registry: dict = {}

    def decorator(kind):
        def named(plugin_id):
            def record(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn

            return record

        return named

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype = list(shape), dtype

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

        def aliased(self):
            out = TensorDesc(self.shape_expr, self.dtype)
            out.aliased_to = self
            return out

    class AutoTuneCombination:
        def __init__(self, io_types=None, layouts=None, tactics=None):
            self.io_types, self.positions, self.tactic_ids = io_types, [], list(tactics or [])

        def pos(self, indices, types_):
            self.positions.append((list(indices), types_))

        def tactics(self, ids):
            self.tactic_ids = list(ids)

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = shared_mem = None

    class SymIntExprs(list):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    trtp.TensorDesc, trtp.AutoTuneCombination = TensorDesc, AutoTuneCombination
    trtp.KernelLaunchParams = KernelLaunchParams
    trtp.SymExprs = trtp.SymIntExprs = SymIntExprs
    trtp.SymInt32 = int
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    trt.plugin = trtp
    assert typing  # annotations in the wrappers use typing generics over these classes
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp
    return registry


def _trt_worker() -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    registry = _install_fake_tensorrt()
    import tensorrt as trt

    from nld_trt.plugins import _trt, trt as plugins_trt
    from nld_trt.plugins.aot import ptx_params

    _trt.build_arch = lambda: 90  # no GPU here: build for sm_90
    names = plugins_trt.register_all()
    DT = trt.DataType
    desc = trt.plugin.TensorDesc
    b, hq, hkv, t, n, w, v = 3, 32, 8, 16, 257, 128, 32000
    meta = [desc([b], DT.INT32) for _ in range(3)]
    caches = [desc([n, PAGE, hkv, HEAD_DIM], DT.FP8) for _ in range(2)]
    table = desc([b, w], DT.INT32)
    cases = {
        "nld::write_kv": (
            [*(desc([b, hkv, t, HEAD_DIM], DT.BF16) for _ in range(2)), *caches, table, *meta[:2]],
            [20.0, 50.0, 1], None,
        ),
        "nld::block_attention": (
            [desc([b, hq, t, HEAD_DIM], DT.BF16), *caches, table, *meta], [0.088, 0.05, 0.02], 2,
        ),
        "nld::spec_accept": ([desc([b, t], DT.INT32), desc([b, t, v], DT.BF16)], [], None),
        "nld::dlm_select": ([desc([b, t, v], DT.HALF), desc([b, t], DT.INT32), desc([b], DT.INT32)], [0.9], None),
    }
    report = {"names": list(names), "kinds": {k: sorted(v) for k, v in registry.items()}, "plugins": {}}
    for name, (inputs, attrs, tactic) in cases.items():
        fns = registry[name]
        outputs = fns["register"](*inputs, *attrs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        combos = fns["autotune"](*inputs, outputs)
        extra = [tactic] if tactic is not None else []
        kernel_name, ptx, params, extras = fns["aot_impl"](*inputs, *attrs, outputs, *extra)
        ptx = ptx.decode()
        report["plugins"][name] = dict(
            outputs=[(list(o.shape_expr), o.dtype.name) for o in outputs],
            aliased=[inputs.index(o.aliased_to) if hasattr(o, "aliased_to") else None for o in outputs],
            tactics=[c.tactic_ids for c in combos],
            kernel_in_ptx=f".entry {kernel_name.decode()}(" in ptx,
            params=ptx_params(ptx),
            n_inputs=len(inputs), n_outputs=len(outputs), extras=list(extras),
            grid=[params.grid_x, params.grid_y, params.grid_z], block_x=params.block_x, shared=params.shared_mem,
        )
    return report


# ---------------------------------------------------------------------------------------------------------
# Test side


def _run_worker(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _collect(proc: subprocess.Popen):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int], dict]:
    procs = [_run_worker("compile", str(i), str(SHARDS)) for i in range(SHARDS)]
    rows = [row for proc in procs for row in _collect(proc)]
    return {(row["label"], row["arch"]): row for row in rows}


@pytest.fixture(scope="module")
def trt_report() -> dict:
    return _collect(_run_worker("trt"))


def test_every_kernel_compiles_to_ptx_and_cubin(compiled):
    failed = {key: row["error"] for key, row in compiled.items() if not row["ok"]}
    assert not failed, failed
    assert len(compiled) == len(compile_matrix())
    for key, row in compiled.items():
        assert row["elf"] and row["cubin_bytes"] > 0 and row["target"] and row["version"], key
        assert row["params"] == row["expected"], key  # the launcher's argument list, scratch pointers included


def test_every_kernel_is_compiled_for_every_arch(compiled):
    for kernel in ("attention", "write_kv", "spec_accept", "dlm_select"):  # (other page sizes on sm_90 only)
        archs = {arch for (label, arch) in compiled if label.startswith(kernel)}
        assert archs == {80, 89, 90}, kernel


def test_fp8_variants_refuse_sm80():
    spec = A.attention_spec("bf16", "fp8e4nv", HEAD_DIM, PAGE, A.attention_tactics("bf16")[1])
    assert spec.min_arch == FP8_MIN_ARCH == 89
    assert A.write_spec("bf16", "fp8e4nv", HEAD_DIM, PAGE, 8).min_arch == 89
    assert A.attention_spec("bf16", "bf16", HEAD_DIM, PAGE, A.attention_tactics("bf16")[1]).min_arch == 80


def test_trt_wrappers_register_and_build_launches(trt_report):
    assert trt_report["names"] == ["nld::write_kv", "nld::block_attention", "nld::spec_accept", "nld::dlm_select"]
    for name, kinds in trt_report["kinds"].items():
        assert kinds == ["aot_impl", "autotune", "register"], name
    b, hq, hkv, t, n, w, v = 3, 32, 8, 16, 257, 128, 32000
    for name, rep in trt_report["plugins"].items():
        assert rep["kernel_in_ptx"], name
        # TensorRT passes the inputs, the int32 extras, the outputs; Triton's scratch pointers come last
        expected = ["u64"] * rep["n_inputs"] + ["u32"] * len(rep["extras"]) + ["u64"] * (rep["n_outputs"] + 2)
        assert rep["params"] == expected, name
        assert rep["shared"] <= 48 * 1024
    write = trt_report["plugins"]["nld::write_kv"]
    # the caches come back as outputs aliased to the cache inputs (2 and 3): written in place, not copied
    assert write["outputs"] == [[[n, PAGE, hkv, HEAD_DIM], "FP8"]] * 2 and write["aliased"] == [2, 3]
    k_str, c_str = contiguous_strides([b, hkv, t, HEAD_DIM]), contiguous_strides([n, PAGE, hkv, HEAD_DIM])
    c_str = [c_str[0], c_str[2], c_str[1]]  # the kernels take (page, head, position) strides
    assert write["extras"] == [t, hkv, w * PAGE, *k_str[:3], *k_str[:3], *c_str, *c_str, w]
    assert write["grid"] == [b * hkv, 1, 1]
    att = trt_report["plugins"]["nld::block_attention"]
    assert att["outputs"] == [[[b, hq, t, HEAD_DIM], "BF16"]] and att["aliased"] == [None]
    assert att["tactics"] == [[1, 2]]
    q_str = contiguous_strides([b, hq, t, HEAD_DIM])
    assert att["extras"] == [t, hkv, hq // hkv, w * PAGE, *q_str[:3], *c_str, *c_str, *q_str[:3], w]
    assert att["grid"] == [b * hkv, cdiv(t * hq // hkv, 64), 1] and att["block_x"] == 128
    acc = trt_report["plugins"]["nld::spec_accept"]
    assert acc["outputs"] == [[[b], "INT32"], [[b], "INT32"]]
    assert acc["extras"] == [t, v, t, t * v, v] and acc["grid"] == [b, 1, 1]
    sel = trt_report["plugins"]["nld::dlm_select"]
    assert sel["outputs"] == [[[b, t], "INT32"], [[b, t], "FLOAT"], [[b, t], "INT32"]]
    assert sel["extras"] == [t, v, t * v, v, t] and sel["block_x"] == S.TRT_CONFIG.num_warps * 32


def test_without_tensorrt_registration_says_what_to_install():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from nld_trt.plugins import trt as plugins_trt

    with pytest.raises(RuntimeError, match=r"TensorRT >= 10\.9.*pip install tensorrt-cu12"):
        plugins_trt.register_all()


# plain-Python shape and launch logic ------------------------------------------------------------------


def test_signatures_follow_the_kernel_parameter_order():
    scales = {"qk_scale": 1.0, "v_scale": 2.0}
    spec = A.attention_spec("bf16", "fp8e4nv", 64, PAGE, A.attention_tactics("bf16")[2], specialize=scales)
    names = list(spec.signature)
    assert names == [*A.ATTENTION_INPUTS, *A.ATTENTION_INTS, *A.ATTENTION_FLOATS, "O", *A.ATTENTION_CONSTEXPRS]
    assert spec.runtime_args == [*A.ATTENTION_INPUTS, *A.ATTENTION_INTS, "O"]
    assert spec.signature["K"] == "*fp8e4nv" and spec.signature["Q"] == spec.signature["O"] == "*bf16"
    assert spec.constexprs["BLOCK_D"] == 64 and spec.constexprs["v_scale"] == 2.0 and spec.constexprs["PAGE_SIZE"] == PAGE
    assert spec.signature["TABLES"] == "*i32"
    torch_path = A.attention_spec("fp32", "fp32", 8, PAGE, A.INTERPRET_CONFIG, upcast=True)
    assert torch_path.signature["qk_scale"] == "fp32" and torch_path.constexprs["BLOCK_D"] == 16
    write = A.write_spec("fp16", "fp8e4nv", 128, PAGE, 8)
    assert write.runtime_args == [*A.WRITE_INPUTS, *A.WRITE_INTS, *A.WRITE_FLOATS, "K_CACHE", "V_CACHE"]
    assert write.signature["K_IN"] == write.signature["K_CACHE"] == "*fp8e4nv"
    assert write.constexprs["QUANT_MAX"] == 448.0
    assert A.write_spec("fp16", "fp16", 128, PAGE, 8).constexprs["QUANT_MAX"] == 0
    assert A.write_spec("fp16", "fp32", 128, PAGE, 8, quantize=True).constexprs["QUANT_MAX"] == 448.0
    with pytest.raises(TypeError, match="quantize must be on"):
        A.write_spec("fp16", "fp8e4nv", 128, PAGE, 8, quantize=False)
    accept = S.accept_spec("fp16", S.TRT_CONFIG)
    assert accept.runtime_args == [*S.ACCEPT_INPUTS, *S.ACCEPT_INTS, *S.ACCEPT_OUTPUTS]
    select = S.select_spec("fp32", S.TRT_CONFIG, specialize={"threshold": 0.9})
    assert select.runtime_args == [*S.SELECT_INPUTS, *S.SELECT_INTS, *S.SELECT_OUTPUTS]
    with pytest.raises(TypeError):
        A.attention_spec("fp8e4nv", "bf16", 64, PAGE, A.INTERPRET_CONFIG)


def test_grids_tiles_and_outputs():
    cfg = A.AttentionConfig(16, 64)
    assert A.attention_grid(8, 8, 1, 4, cfg) == (64, 1)  # decode: 4 packed rows in one tile
    assert A.attention_grid(8, 8, 32, 4, cfg) == (64, 8)
    assert A.attention_config(4, "bf16", interpret=False) == A.attention_tactics("bf16")[1]
    assert A.attention_config(128, "fp32", interpret=False) == A.attention_tactics("fp32")[2]
    assert A.block_d(8) == 16 and A.block_d(128) == 128 and A.block_d(96) == 128
    assert A.write_block_t(1) == 1 and A.write_block_t(5) == 8 and A.write_block_t(500) == 32
    assert A.write_grid(2, 8, 33, 32) == (16, 2)
    assert A.attention_output((2, 8, 4, 64), "bf16") == ((2, 8, 4, 64), "bf16")
    assert S.accept_outputs(4) == [((4,), "i32"), ((4,), "i32")]
    assert S.select_outputs(4, 32) == [((4, 32), "i32"), ((4, 32), "fp32"), ((4, 32), "i32")]
    assert S.grid(7) == (7,)
    assert contiguous_strides([2, 3, 4, 5]) == [60, 20, 5, 1]


def test_scales_fold_into_the_kernel_scalars():
    s = A.attention_scales(0.125, 0.5, 0.25)
    assert s["qk_scale"] == pytest.approx(0.125 * 0.5 * 1.4426950408889634) and s["v_scale"] == 0.25
    assert A.write_scales(2.0, 4.0) == {"k_inv_scale": 2.0, "v_inv_scale": 4.0}  # the layout's quant multipliers


def test_shape_checks():
    A.check_shapes((2, 8, 4, 64), (5, 16, 2, 64), (5, 16, 2, 64), (2, 7), [2, 2, 2])
    bad = [
        ((2, 6, 4, 64), (5, 16, 4, 64), (2, 7), [2] * 3),  # Hq not a multiple of Hkv
        ((2, 8, 4, 32), (5, 16, 2, 64), (2, 7), [2] * 3),  # head dims differ
        ((2, 8, 4, 64), (5, 16, 2, 64), (2, 7), [2, 1, 2]),  # a per-sequence tensor of the wrong size
        ((2, 8, 4, 64), (5, 16, 2, 64), (3, 7), [2] * 3),  # a page table per row
    ]
    for q, kv, table, meta in bad:
        with pytest.raises(ValueError):
            A.check_shapes(q, kv, kv, table, meta)
    A.check_write_shapes((2, 2, 4, 64), (5, 16, 2, 64), (2, 7))
    with pytest.raises(ValueError):
        A.check_write_shapes((2, 2, 4, 64), (5, 16, 2, 64), (1, 7))
    S.check_shapes((2, 4, 100), [(2, 4)], [2])
    with pytest.raises(ValueError):
        S.check_shapes((2, 4, 100), [(2, 5)], [])


def test_importing_the_plugins_does_not_import_triton():
    code = (
        "import sys, nld_trt.plugins.trt, nld_trt.plugins.block_attention, nld_trt.plugins.spec_accept;"
        "print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


if __name__ == "__main__":
    if sys.argv[1] == "compile":
        print(json.dumps(_compile_worker(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(_trt_worker()))
