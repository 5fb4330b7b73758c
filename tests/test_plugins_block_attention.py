"""The block-attention Triton kernels against the PyTorch reference, in Triton's CPU interpreter.

Every case mixes causal and block rows, uneven committed lengths and padded chunks, reads each row through
its own page table (pages in no order, a page boundary inside every 16-key tile of the interpreter config),
and places chunks across tiles. Tolerances: fp32 1e-5 absolute; bf16/fp16 outputs 1e-2 absolute + 1e-2
relative (the interpreter computes in fp32 but truncates when it stores a 16-bit value, up to 1 ulp = 2^-7
relative for bf16; the reference rounds).
"""

from __future__ import annotations

import pytest
import torch

from nld_trt.plugins.block_attention import block_attention, write_kv
from nld_trt.plugins.block_attention.reference import (
    dequantize,
    quantize,
    reference_attention,
    reference_write_kv,
)
from nld_trt.plugins.interpret import use_interpreter

use_interpreter()  # the kernels run in Triton's CPU interpreter here (see nld_trt.plugins.interpret)

TOL = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-2, 1e-2)}
PAGES, PAGE, WIDTH = 40, 8, 12  # a pool of 40 pages of 8 positions; tables of 12 pages (96 positions)
MAX_LEN = PAGE * WIDTH


def _batch(chunk: int, groups: int, dtype: torch.dtype, head_dim: int = 32, kv_heads: int = 2, seed: int = 0,
           page: int = PAGE):
    """Three rows with their own shuffled pages: committed 0 / 5 / 37, chunk lengths full / -1 / half, rows
    causal, block, causal. Caches are random everywhere (stale data past L + n must never be read)."""
    g = torch.Generator().manual_seed(seed)
    width = MAX_LEN // page
    pages = 3 * width + 2
    q = torch.randn(3, kv_heads * groups, chunk, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(pages, page, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(pages, page, kv_heads, head_dim, generator=g).to(dtype)
    meta = dict(
        tables=torch.randperm(pages, generator=g)[: 3 * width].view(3, width),
        committed=torch.tensor([0, 5, 37]),
        chunk_lens=torch.tensor([chunk, max(1, chunk - 1), max(1, chunk // 2)]),
        block=torch.tensor([False, True, False]),
    )
    return q, k_cache, v_cache, meta


def _real(chunk_lens: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, 1, T, 1] True at real (non-padding) chunk positions."""
    return (torch.arange(chunk)[None, :] < chunk_lens[:, None])[:, None, :, None]


def _max_err(out: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> float:
    return float(((out.float() - ref.float()).abs() * real).max())


def _assert_close(out, ref, real, dtype):
    atol, rtol = TOL[dtype]
    bound = atol + rtol * ref.float().abs()
    excess = ((out.float() - ref.float()).abs() - bound) * real
    assert float(excess.max()) <= 0, f"max error {_max_err(out, ref, real):.3g} over atol={atol} rtol={rtol}"


@pytest.mark.parametrize("chunk", [1, 4, 32])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("page", [8, 32])
def test_fp32_matches_reference(chunk, groups, page):
    q, kc, vc, meta = _batch(chunk, groups, torch.float32, page=page)
    scale = q.shape[-1] ** -0.5
    out = block_attention(q, kc, vc, **meta, scale=scale)
    ref = reference_attention(q, kc, vc, **meta, scale=scale)
    real = _real(meta["chunk_lens"], chunk)
    assert _max_err(out, ref, real) <= 1e-5
    assert torch.all(out * ~real == 0), "padding queries must be zero"


@pytest.mark.parametrize(
    "dtype,chunk,groups", [(torch.bfloat16, 1, 4), (torch.bfloat16, 32, 1), (torch.float16, 4, 4)]
)
def test_16bit_matches_reference(dtype, chunk, groups):
    q, kc, vc, meta = _batch(chunk, groups, dtype)
    scale = q.shape[-1] ** -0.5
    out = block_attention(q, kc, vc, **meta, scale=scale)
    assert out.dtype == dtype
    real = _real(meta["chunk_lens"], chunk)
    _assert_close(out, reference_attention(q, kc, vc, **meta, scale=scale), real, dtype)
    # and against the exact answer (fp32 reference on the same inputs)
    ref32 = reference_attention(q.float(), kc.float(), vc.float(), **meta, scale=scale)
    _assert_close(out, ref32, real, dtype)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_matches_reference_on_dequantized_cache(q_dtype):
    q, kc, vc, meta = _batch(4, 4, q_dtype, seed=1)
    k_scale, v_scale = 0.05, 0.02
    kc8 = quantize(kc.float() * 3, k_scale, torch.float8_e4m3fn)
    vc8 = quantize(vc.float(), v_scale, torch.float8_e4m3fn)
    scale = q.shape[-1] ** -0.5
    out = block_attention(q, kc8, vc8, **meta, scale=scale, k_scale=k_scale, v_scale=v_scale)
    ref = reference_attention(q, kc8, vc8, **meta, scale=scale, k_scale=k_scale, v_scale=v_scale)
    assert ref.dtype == torch.float32  # the reference ran on the dequantized fp32 cache
    _assert_close(out, ref, _real(meta["chunk_lens"], 4), q_dtype)
    # a quantized layout may hold its e4m3 values in a wider cache (the float32 engine graph does): same result
    wide = block_attention(q, kc8.float(), vc8.float(), **meta, scale=scale, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(wide.float(), out.float()) or _max_err(wide, out, _real(meta["chunk_lens"], 4)) <= 1e-6


def test_small_head_dim_and_strided_q():
    """head_dim 8 (the tiny test models') pads to the 16-wide dot; q as a transposed [B, T, H, D] view."""
    q, kc, vc, meta = _batch(4, 4, torch.float32, head_dim=8)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous()
    out = block_attention(q_view, kc, vc, **meta, scale=0.3)
    ref = reference_attention(q, kc, vc, **meta, scale=0.3)
    assert _max_err(out, ref, _real(meta["chunk_lens"], 4)) <= 1e-5


def test_empty_row_gives_zeros_and_others_are_unaffected():
    """A row with nothing to attend to (L = 0, n = 0) must not produce NaN or disturb its neighbours."""
    q, kc, vc, meta = _batch(4, 1, torch.float32)
    meta["chunk_lens"] = torch.tensor([0, 3, 4])
    out = block_attention(q, kc, vc, **meta, scale=0.2)
    assert torch.all(out[0] == 0)
    ref = reference_attention(q[1:], kc, vc, **{k: v[1:] for k, v in meta.items()}, scale=0.2)
    assert _max_err(out[1:], ref, _real(meta["chunk_lens"][1:], 4)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_the_executors_paged_write(dtype):
    _, kc, vc, meta = _batch(8, 1, dtype)
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(3, 2, 8, 32, generator=g).to(dtype) for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, meta["tables"], meta["committed"], meta["chunk_lens"])
    reference_write_kv(k, v, kc_ref, vc_ref, meta["tables"], meta["committed"], meta["chunk_lens"])
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert not torch.equal(kc, _batch(8, 1, dtype)[1])  # it did write


def test_write_kv_fp8_quantizes_like_the_reference_in_any_cache_dtype():
    _, kc, vc, meta = _batch(8, 1, torch.float32)
    kc8, vc8 = (torch.zeros(kc.shape, dtype=torch.float8_e4m3fn) for _ in range(2))
    kc8_ref, vc8_ref = kc8.clone(), vc8.clone()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(3, 2, 8, 32, generator=g) * 40, torch.randn(3, 2, 8, 32, generator=g)  # k saturates
    args = (meta["tables"], meta["committed"], meta["chunk_lens"])
    write_kv(k, v, kc8, vc8, *args, k_quant=20.0, v_quant=100.0)
    reference_write_kv(k, v, kc8_ref, vc8_ref, *args, 20.0, 100.0)
    assert torch.equal(kc8.view(torch.uint8), kc8_ref.view(torch.uint8))
    assert torch.equal(vc8.view(torch.uint8), vc8_ref.view(torch.uint8))
    wide_k, wide_v = torch.zeros(kc.shape), torch.zeros(vc.shape)  # the same e4m3 values, held in fp32
    write_kv(k, v, wide_k, wide_v, *args, k_quant=20.0, v_quant=100.0)
    assert torch.equal(wide_k, kc8.float()) and torch.equal(wide_v, vc8.float())
    with pytest.raises(TypeError, match="pass k_quant"):
        write_kv(k, v, kc8, vc8, *args)


def test_write_kv_skips_positions_past_the_page_table():
    _, kc, vc, meta = _batch(8, 1, torch.float32)
    meta["committed"] = torch.tensor([0, 5, MAX_LEN - 3])  # row 2: only 3 of its 4 tokens fit
    k, v = torch.ones(3, 2, 8, 32), torch.ones(3, 2, 8, 32)
    before = kc.clone()
    write_kv(k, v, kc, vc, meta["tables"], meta["committed"], meta["chunk_lens"])
    last = meta["tables"][2, -1]
    assert torch.all(kc[last, PAGE - 3 :] == 1)
    untouched = torch.ones(kc.shape[0], dtype=torch.bool)
    untouched[meta["tables"][0, :1]] = untouched[meta["tables"][1, :2]] = untouched[last] = False
    assert torch.equal(kc[untouched], before[untouched])


@pytest.mark.parametrize("groups", [1, 4])
def test_one_forward_pass_write_then_attend(groups):
    """The executor's sequence: write the chunk's K/V into the pages (PagedStep), then attend with the chunk
    mask over every row's first max(L + n) positions; the kernels do the same in two launches."""
    q, kc, vc, meta = _batch(4, groups, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(3, 2, 4, 32, generator=g) for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, meta["tables"], meta["committed"], meta["chunk_lens"])
    out = block_attention(q, kc, vc, **meta, scale=0.17)
    reference_write_kv(k, v, kc_ref, vc_ref, meta["tables"], meta["committed"], meta["chunk_lens"])
    ref = reference_attention(q, kc_ref, vc_ref, **meta, scale=0.17)
    assert _max_err(out, ref, _real(meta["chunk_lens"], 4)) <= 1e-5


def test_cache_overrun_is_truncated_not_a_fault():
    """L + n past what the page table covers: keys beyond it are not read (the kernel must not fault or go
    out of bounds); the rows that fit are unaffected."""
    q, kc, vc, meta = _batch(4, 1, torch.float32)
    meta["committed"] = torch.tensor([0, 5, MAX_LEN - 2])
    out = block_attention(q, kc, vc, **meta, scale=0.2)
    assert torch.isfinite(out).all()
    ref = reference_attention(q[:2], kc, vc, **{k: v[:2] for k, v in meta.items()}, scale=0.2)
    assert _max_err(out[:2], ref, _real(meta["chunk_lens"][:2], 4)) <= 1e-5


def test_rejects_bad_shapes():
    q, kc, vc, meta = _batch(4, 1, torch.float32)
    with pytest.raises(ValueError):
        block_attention(q[:, :1], kc, vc, **meta, scale=1.0)  # Hq=1 < Hkv=2
    with pytest.raises(ValueError):
        block_attention(q, kc, vc, **{**meta, "tables": meta["tables"][:2]}, scale=1.0)


def test_dequantize_roundtrip_is_within_fp8_precision():
    x = torch.randn(1000) * 3
    back = dequantize(quantize(x, 0.1, torch.float8_e4m3fn), 0.1)
    assert float(((back - x).abs() / x.abs().clamp_min(0.1)).max()) <= 2**-3


def test_fp8_rounding_is_torchs_on_every_midpoint():
    """Every finite e4m3 value, every midpoint between neighbours (ties to even), saturation, zeros.
    Compared as values: Triton 3.7's interpreter drops the sign of -0.0 on conversion (the GPU keeps it)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].unique()
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, mids * (1 + 2**-12), torch.tensor([500.0, -500.0, -0.0, 0.0])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 16)).view(1, 1, -1, 16)
    t = x.shape[2]
    caches = [torch.zeros(1, t, 1, 16, dtype=torch.float8_e4m3fn) for _ in range(4)]  # one page of t positions
    meta = (torch.tensor([[0]]), torch.tensor([0]), torch.tensor([t]))
    write_kv(x, x, caches[0], caches[1], *meta, k_quant=1.0, v_quant=1.0)
    reference_write_kv(x, x, caches[2], caches[3], *meta, 1.0, 1.0)
    assert torch.equal(caches[0].float(), caches[2].float())


def _bench_script():
    import importlib.util
    import sys
    from pathlib import Path

    if "bench_kernels" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
        spec = importlib.util.spec_from_file_location("bench_kernels", path)
        sys.modules["bench_kernels"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["bench_kernels"]


# flex_attention is a GPU baseline; on CPU, uncompiled, it says so. Its numbers are what is checked here.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_script_baselines_agree_with_the_kernel_on_cpu():
    """What scripts/bench_kernels.py times on a GPU, run once on tiny shapes: the three implementations
    must compute the same attention (flex eager here; the script compiles it on the GPU)."""
    bench = _bench_script()
    case = bench.attention_case(2, 20, 4, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    out = bench.ours(case)()
    assert float((out - bench.sdpa_reference(case)()).abs().max()) <= 1e-5
    assert float((out - bench.flex(case, compiled=False)()).abs().max()) <= 1e-5
    assert case.bytes_moved() == 2 * 2 * 24 * 2 * 16 * 4 + 2 * out.numel() * 4


def test_bench_script_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _bench_script().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
