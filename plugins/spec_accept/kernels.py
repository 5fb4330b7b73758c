"""Triton kernels that turn a pass's logits into decisions on the GPU, so [B, T, V] logits never leave it.

- `spec_accept_kernel` (linear_spec verify): per sequence, the greedy token a_j of every chunk position,
  the leading matches n (a_j == draft[j + 1] for j < n), accepted count n + 1 and next token a_n.
- `dlm_select_kernel` (dlm denoising step): per position the argmax candidate and its softmax
  confidence; fill flags: among still-masked positions the most confident always, the others with
  confidence >= threshold (all of them on a row's last allowed pass, FILL_ALL[b] != 0).
Semantics are nld_trt/decoding/select.py (greedy, temperature 0). One program per sequence walks its T
rows in tiles of BLOCK_T and V in tiles of BLOCK_V (online max / argmax / sum of exp). Parameter order is
TensorRT's AOT convention: input pointers, int32 scalars, float scalars, output pointers, constexprs.
"""

import triton
import triton.language as tl

# tl.reduce with the standard combine functions instead of tl.max / tl.sum / tl.argmax / tl.zeros: those
# are @jit functions themselves, decorated when triton is imported, and the interpreter needs builtins (it
# runs these reductions in numpy); compiled, it is the same code (see plugins.interpret).
from triton.language.standard import (
    _argmax_combine_tie_break_left,
    _elementwise_min,
    _sum_combine,
)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _argmax_softmax(row_ptrs, row_ok, V, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, WITH_CONF: tl.constexpr):
    """Argmax (first index on ties, like torch.argmax) and its softmax probability of BLOCK_T rows of V
    logits; rows with row_ok False return garbage."""
    cols = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_T], -1.0e30, tl.float32)  # finite: no inf - inf on masked rows
    idx = tl.full([BLOCK_T], 0, tl.int32)
    total = tl.full([BLOCK_T], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptrs[:, None] + c[None, :], mask=row_ok[:, None] & (c < V)[None, :], other=float("-inf"))
        x = x.to(tl.float32)
        tile_max, tile_idx = tl.reduce((x, tl.broadcast_to(cols[None, :], (BLOCK_T, BLOCK_V))), 1,
                                       _argmax_combine_tie_break_left)
        tile_idx += start
        better = tile_max > best  # strict: an earlier tile keeps ties
        idx = tl.where(better, tile_idx, idx)
        new_best = tl.maximum(best, tile_max)
        if WITH_CONF:
            total = total * tl.exp2((best - new_best) * LOG2E) \
                + tl.reduce(tl.exp2((x - new_best[:, None]) * LOG2E), 1, _sum_combine)
        best = new_best
    return idx, 1.0 / tl.maximum(total, 1.0)  # a real row's sum is >= 1 (its max contributes 1)


@triton.jit
def spec_accept_kernel(
    DRAFT, LOGITS,
    T, V, stride_db, stride_lb, stride_lt,
    ACCEPTED, NEXT_TOKEN,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t_local = tl.arange(0, BLOCK_T)
    n = T  # first stop so far; position T - 1 always stops, so at most T - 1 drafts are accepted
    next_token = 0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + t_local
        row_ok = t < T
        tokens, _ = _argmax_softmax(LOGITS + b * stride_lb + t.to(tl.int64) * stride_lt, row_ok, V,
                                    BLOCK_T, BLOCK_V, False)
        following = tl.load(DRAFT + b * stride_db + t + 1, mask=t + 1 < T, other=-1)
        stop = row_ok & ((t == T - 1) | (tokens != following))
        first = tl.reduce(tl.where(stop, t, T), 0, _elementwise_min)
        found = first < n  # only in the first tile that has a stop: tiles go in order
        next_token = tl.where(found, tl.reduce(tl.where(t == first, tokens, 0), 0, _sum_combine), next_token)
        n = tl.minimum(n, first)
    tl.store(ACCEPTED + b, n + 1)
    tl.store(NEXT_TOKEN + b, next_token)


@triton.jit
def dlm_select_kernel(
    LOGITS, MASKED, FILL_ALL,
    T, V, stride_lb, stride_lt, stride_mb,
    threshold,
    TOKENS, CONF, FILL,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # TOKENS, CONF and FILL are contiguous [B, T].
    b = tl.program_id(0).to(tl.int64)
    fill_all = tl.load(FILL_ALL + b) != 0
    t_local = tl.arange(0, BLOCK_T)
    best_conf = -1.0
    best_t = -1
    for t0 in range(0, T, BLOCK_T):
        t = t0 + t_local
        row_ok = t < T
        tokens, conf = _argmax_softmax(LOGITS + b * stride_lb + t.to(tl.int64) * stride_lt, row_ok, V,
                                       BLOCK_T, BLOCK_V, True)
        masked = row_ok & (tl.load(MASKED + b * stride_mb + t, mask=row_ok, other=0) != 0)
        fill = masked & (fill_all | (conf >= threshold))
        tl.store(TOKENS + b * T + t, tokens, mask=row_ok)
        tl.store(CONF + b * T + t, conf, mask=row_ok)
        tl.store(FILL + b * T + t, fill.to(tl.int32), mask=row_ok)
        # Most confident masked position, first on ties (torch.argmax over where(masked, conf, -1)).
        cand = tl.where(masked, conf, -1.0)
        tile_best, tile_t = tl.reduce((cand, t_local), 0, _argmax_combine_tie_break_left)
        tile_t += t0
        take = tile_best > best_conf
        best_t = tl.where(take, tile_t, best_t)
        best_conf = tl.where(take, tile_best, best_conf)
    tl.debug_barrier()  # the tile stores above must land before this one (other threads wrote them)
    if best_t >= 0:
        tl.store(FILL + b * T + best_t, 1)
