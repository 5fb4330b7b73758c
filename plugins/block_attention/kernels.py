"""Triton kernels: chunk attention against the paged KV cache, and the chunk's K/V write into its pages.

Parameter order is
TensorRT's AOT calling convention: input pointers, int32 scalars, float scalars (specialized to constexprs
by the TensorRT wrapper, runtime fp32 on the torch path), output pointers, then constexprs.

Semantics (nld_trt/attention.py, nld_trt/kv): row b has L = COMMITTED[b] cached positions and n =
CHUNK_LENS[b] chunk tokens at L..L+n-1; position p of row b lives at offset p % PAGE_SIZE of page
TABLES[b, p // PAGE_SIZE] of the cache [pages, PAGE_SIZE, Hkv, D] (any strides: stride_kn, stride_kp, stride_kh). Chunk query j sees 0..L-1 plus chunk keys
0..j (causal) or all n (IS_BLOCK[b] != 0). Query heads h = kvh * GROUPS + g share KV head kvh; the GROUPS
heads of one KV head and the T chunk tokens are packed into the rows of one tile (row r = j * GROUPS + g),
so a KV tile is loaded once for all of them, each key through its page table entry. UPCAST computes in fp32
(the interpreter mishandles bf16/fp16 arithmetic).
"""

import triton
import triton.language as tl

# tl.reduce with the standard combine functions instead of tl.max / tl.sum / tl.zeros: those are @jit
# functions themselves, decorated when triton is imported, and the interpreter needs builtins (it runs
# these reductions in numpy); compiled, it is the same code (see plugins.interpret).
from triton.language.standard import _elementwise_max, _sum_combine


@triton.jit
def block_attention_kernel(
    Q, K, V, TABLES, COMMITTED, CHUNK_LENS, IS_BLOCK,
    T, HKV, GROUPS, MAX_KEYS,
    stride_qb, stride_qh, stride_qt,
    stride_kn, stride_kh, stride_kp,
    stride_vn, stride_vh, stride_vp,
    stride_ob, stride_oh, stride_ot,
    stride_tb,
    qk_scale, v_scale,
    O,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr,
):
    # qk_scale = softmax scale * k dequant scale * log2(e) (exp2 below); v_scale = v dequant scale.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    table = TABLES + b.to(tl.int64) * stride_tb
    L = tl.load(COMMITTED + b)
    n = tl.load(CHUNK_LENS + b)
    is_block = tl.load(IS_BLOCK + b) != 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = rows // GROUPS
    head = kvh * GROUPS + rows % GROUPS
    row_ok = rows < T * GROUPS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q_ptrs = Q + b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh \
        + j.to(tl.int64)[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this tile can see: every committed one, then the chunk up to the tile's last query (causal);
    # never past what the page table covers (a caller overrunning it gets a truncated context, not a fault).
    j_last = (pid_m * BLOCK_M + BLOCK_M - 1) // GROUPS
    kv_end = tl.minimum(L + tl.where(is_block, n, tl.minimum(n, j_last + 1)), MAX_KEYS)

    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked tile gives alpha = 1, p = 0
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        p_ok = p < kv_end
        kv_mask = p_ok[:, None] & d_ok[None, :]
        page = tl.load(table + p // PAGE_SIZE, mask=p_ok, other=0).to(tl.int64)[:, None]
        offset = (p % PAGE_SIZE).to(tl.int64)[:, None]
        k = tl.load(k_head + page * stride_kn + offset * stride_kp + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        rel = p[None, :] - L
        visible = (rel < 0) | ((rel < n) & (is_block | (rel <= j[:, None])))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(prob, 1, _sum_combine)
        v = tl.load(v_head + page * stride_vn + offset * stride_vp + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(prob.to(q.dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    out = tl.where((j < n)[:, None], out, 0.0)  # padding queries: zeros, deterministic
    o_ptrs = O + b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh \
        + j.to(tl.int64)[:, None] * stride_ot + d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _round_to_e4m3(x):
    """Round fp32 x (|x| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    The final .to(fp8) is then exact everywhere; Triton's interpreter rounds fp32 -> fp8 wrongly (ties
    up, no carry into the exponent), and on the GPU this costs a few integer ops on a memory-bound copy.
    """
    bits = x.to(tl.int32, bitcast=True)
    negative = bits < 0  # the sign bit, so -0.0 stays -0.0
    # normal range: keep 3 of 23 mantissa bits, round half to even (carries into the exponent correctly)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormal range (|x| < 2^-6): a multiple of 2^-9, rounded by an fp32 add where the ulp is 2^-9;
    # on |x| so that tiny negatives keep their sign (-0.0, as torch's conversion gives)
    mag = (tl.abs(x) + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, tl.where(negative, -mag, mag), normal)


@triton.jit
def write_kv_kernel(
    K_NEW, V_NEW, K_IN, V_IN, TABLES, COMMITTED, CHUNK_LENS,
    T, HKV, MAX_KEYS,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ckn, stride_ckh, stride_ckp,
    stride_cvn, stride_cvh, stride_cvp,
    stride_tb,
    k_inv_scale, v_inv_scale,
    K_CACHE, V_CACHE,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    QUANT_MAX: tl.constexpr,
):
    # Chunk token t of row b goes to position L + t: offset (L + t) % PAGE_SIZE of page TABLES[b, (L + t) //
    # PAGE_SIZE]; padding tokens (t >= n) and positions past what the table covers are not written.
    # K_IN / V_IN are the caches as the plugin's inputs; TensorRT aliases its outputs K_CACHE / V_CACHE to them
    # (the same memory: an in-place update), and the kernel writes through the outputs.
    # QUANT_MAX > 0 (a quantized layout): store e4m3(clamp(x * inv_scale)), exactly, in the cache's dtype.
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    h = pid_bh % HKV
    L = tl.load(COMMITTED + b)
    n = tl.load(CHUNK_LENS + b)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = (t < n) & (t < T) & (L + t < MAX_KEYS)
    ok = t_ok[:, None] & (d < HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)[:, None]
    pos = L + t
    page = tl.load(TABLES + b.to(tl.int64) * stride_tb + pos // PAGE_SIZE, mask=t_ok, other=0).to(tl.int64)[:, None]
    offset = (pos % PAGE_SIZE).to(tl.int64)[:, None]

    k = tl.load(K_NEW + b.to(tl.int64) * stride_kb + h * stride_kh + t64 * stride_kt + d[None, :], mask=ok)
    v = tl.load(V_NEW + b.to(tl.int64) * stride_vb + h * stride_vh + t64 * stride_vt + d[None, :], mask=ok)
    if QUANT_MAX > 0:
        k = _round_to_e4m3(tl.clamp(k.to(tl.float32) * k_inv_scale, -QUANT_MAX, QUANT_MAX))
        v = _round_to_e4m3(tl.clamp(v.to(tl.float32) * v_inv_scale, -QUANT_MAX, QUANT_MAX))
    k_dst = K_CACHE + page * stride_ckn + h * stride_ckh + offset * stride_ckp + d[None, :]
    v_dst = V_CACHE + page * stride_cvn + h * stride_cvh + offset * stride_cvp + d[None, :]
    tl.store(k_dst, k.to(K_CACHE.dtype.element_ty), mask=ok)
    tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=ok)
