#!/usr/bin/env python
"""Benchmark the plugin kernels on a CUDA GPU against PyTorch.

Attention on the paged cache (pages of 16, each row's pages scattered): nld_trt.plugins block_attention vs
the executor's reference path (gather the pages, SDPA with GQA and a boolean chunk mask) and vs
flex_attention on a dense copy (compiled, block mask, GQA), for cache lengths 1k/4k/16k,
chunk lengths 1/8/32 and batch 1/8 (half the rows causal, half block). Selection: spec_accept and
dlm_select vs torch on the GPU (argmax / softmax there, decision on the host). Prints microseconds and the
achieved memory bandwidth (bytes the kernel must read and write / time) as a fraction of the GPU's peak:
from a table of known GPUs, else a measured device-to-device copy.

    python scripts/bench_kernels.py [--heads 32 --kv-heads 8 --head-dim 128 --vocab 131072 --dtype bfloat16]

Needs a CUDA GPU with the CUDA build of torch and triton; exits with status 2 and says so otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

# Peak DRAM bandwidth in GB/s, matched against torch.cuda.get_device_name() (first match wins).
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
]
CACHE_LENS = (1024, 4096, 16384)
CHUNKS = (1, 8, 32)
BATCHES = (1, 8)


@dataclass
class AttentionCase:
    q: torch.Tensor
    k_cache: torch.Tensor  # [pages, P, Hkv, D]: the paged cache
    v_cache: torch.Tensor
    tables: torch.Tensor  # [B, W] each row's pages
    committed: torch.Tensor
    chunk_lens: torch.Tensor
    block: torch.Tensor
    scale: float

    @property
    def keys(self) -> int:
        return int((self.committed + self.chunk_lens).max())

    def bytes_moved(self) -> int:
        """K and V of every row's visible keys, q read and the output written."""
        b, hq, t, d = self.q.shape
        hkv = self.k_cache.shape[2]
        kv = 2 * int((self.committed + self.chunk_lens).sum()) * hkv * d * self.k_cache.element_size()
        return kv + 2 * self.q.numel() * self.q.element_size()

    def contiguous(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first `keys` positions as contiguous [B, Hkv, keys, D] K and V (for the dense baselines;
        built outside the timed calls)."""
        from nld_trt.kv.attend import gather, read_index

        cache = SimpleNamespace(k=[self.k_cache], v=[self.v_cache],
                                layout=SimpleNamespace(page_size=self.k_cache.shape[1], scales=None))
        index = read_index(self.tables.long(), torch.arange(self.keys, device=self.q.device), self.k_cache.shape[1])
        k, v = gather(cache, 0, *index, self.q.dtype)
        return k.contiguous(), v.contiguous()


def attention_case(batch: int, cache_len: int, chunk: int, heads: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: str, page_size: int = 16) -> AttentionCase:
    """Each row has `cache_len` committed keys and a full chunk on its own pages (in reverse order, so no row
    reads contiguous memory); even rows causal, odd block."""
    width = -(-(cache_len + chunk) // page_size)
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return AttentionCase(
        q=randn(batch, heads, chunk, head_dim),
        k_cache=randn(batch * width, page_size, kv_heads, head_dim),
        v_cache=randn(batch * width, page_size, kv_heads, head_dim),
        tables=torch.arange(batch * width - 1, -1, -1, device=device, dtype=torch.int32).view(batch, width),
        committed=torch.full((batch,), cache_len, device=device, dtype=torch.int32),
        chunk_lens=torch.full((batch,), chunk, device=device, dtype=torch.int32),
        block=torch.arange(batch, device=device) % 2 == 1,
        scale=head_dim**-0.5,
    )


def ours(case: AttentionCase) -> Callable[[], torch.Tensor]:
    from nld_trt.plugins.block_attention import block_attention

    return lambda: block_attention(case.q, case.k_cache, case.v_cache, case.tables, case.committed,
                                   case.chunk_lens, case.block, case.scale)


def sdpa_reference(case: AttentionCase) -> Callable[[], torch.Tensor]:
    """The PyTorch executor's reference path: gather each row's pages (timed: the executor pays it every
    pass), then SDPA under the chunk mask (built once per forward pass in the executor, so outside)."""
    from nld_trt.attention import attention, chunk_attention_mask
    from nld_trt.kv.attend import gather_pages

    keys, b, page = case.keys, case.q.shape[0], case.k_cache.shape[1]
    head_dim, kv_heads = case.k_cache.shape[3], case.k_cache.shape[2]
    cache = SimpleNamespace(k=[case.k_cache], v=[case.v_cache],
                            layout=SimpleNamespace(page_size=page, scales=None, kv_heads=kv_heads, head_dim=head_dim))
    pages = case.tables.long()[:, : -(-keys // page)].reshape(-1)
    mask = chunk_attention_mask(case.committed.long(), case.chunk_lens.long(), case.block, case.q.shape[2], keys)

    def run() -> torch.Tensor:
        k, v = gather_pages(cache, 0, pages, b, keys, case.q.dtype)
        return attention(case.q, k, v, mask, case.scale)

    return run


def flex(case: AttentionCase, compiled: bool = True) -> Callable[[], torch.Tensor]:
    """flex_attention over the same visibility rule, as a mask_mod and a block mask built outside the call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    keys, (b, _, t, _) = case.keys, case.q.shape
    committed, lens, block = case.committed.long(), case.chunk_lens.long(), case.block

    def visible(bi, h, j, p):
        rel = p - committed[bi]
        return (rel < 0) | ((rel < lens[bi]) & (block[bi] | (rel <= j)))

    mask = create_block_mask(visible, b, None, t, keys, device=case.q.device, _compile=compiled)
    k, v = case.contiguous()  # dense: flex_attention does not read page tables
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda: fn(case.q, k, v, block_mask=mask, scale=case.scale, enable_gqa=True)


def peak_bandwidth() -> tuple[float, str]:
    """(GB/s, where the number comes from)."""
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, f"table ({name})"
    return copy_bandwidth(), f"measured device-to-device copy ({name})"


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def microseconds(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100) * 1e3


def bench_attention(args, peak: float) -> None:
    print(f"\nattention  Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}")
    print(f"{'B':>3} {'cache':>6} {'T':>3} | {'ours us':>9} {'sdpa us':>9} {'flex us':>9} | {'GB/s':>7} {'of peak':>8}"
          f" | {'max err vs sdpa':>15}")
    for batch in BATCHES:
        for cache_len in CACHE_LENS:
            for chunk in CHUNKS:
                case = attention_case(batch, cache_len, chunk, args.heads, args.kv_heads, args.head_dim,
                                      getattr(torch, args.dtype), "cuda")
                times = {}
                for label, make in (("ours", ours), ("sdpa", sdpa_reference), ("flex", flex)):
                    try:
                        times[label] = microseconds(make(case))
                    except Exception as exc:  # a baseline that cannot run this shape is reported, not fatal
                        times[label] = float("nan")
                        print(f"  ({label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
                gbps = case.bytes_moved() / (times["ours"] * 1e-6) / 1e9
                # correctness on the GPU itself (rows past each sequence's chunk are padding, zero in both)
                err = float((ours(case)().float() - sdpa_reference(case)().float()).abs().max())
                print(f"{batch:>3} {cache_len:>6} {chunk:>3} | {times['ours']:>9.1f} {times['sdpa']:>9.1f} "
                      f"{times['flex']:>9.1f} | {gbps:>7.0f} {gbps / peak:>8.1%} | {err:>15.2e}")


def bench_selection(args, peak: float) -> None:
    from nld_trt.decoding.select import accept_greedy, dlm_fill
    from nld_trt.plugins.spec_accept import dlm_select, spec_accept

    print(f"\nselection  V={args.vocab} {args.dtype} logits")
    print(f"{'B':>3} {'T':>3} | {'accept us':>10} {'torch us':>9} | {'select us':>10} {'torch us':>9} | "
          f"{'GB/s':>7} {'of peak':>8}")
    for batch in BATCHES:
        for chunk in (8, 32):
            logits = torch.randn(batch, chunk, args.vocab, device="cuda").to(getattr(torch, args.dtype))
            draft = logits.argmax(-1).int()
            masked = torch.ones(batch, chunk, dtype=torch.bool, device="cuda")

            def torch_accept():
                verify = logits.argmax(-1).cpu()  # what leaves the GPU without the kernel: [B, T] tokens
                return [accept_greedy(d, v) for d, v in zip(draft.cpu(), verify)]

            def torch_select():
                probs = torch.softmax(logits.float(), -1)
                conf, tokens = probs.max(-1)
                conf, m = conf.cpu(), masked.cpu()
                return tokens, [dlm_fill(mi, ci, 0.9) for mi, ci in zip(m, conf)]

            t_acc = microseconds(lambda: spec_accept(draft, logits))
            t_sel = microseconds(lambda: dlm_select(logits, masked, 0.9))
            gbps = logits.numel() * logits.element_size() / (t_acc * 1e-6) / 1e9
            print(f"{batch:>3} {chunk:>3} | {t_acc:>10.1f} {microseconds(torch_accept):>9.1f} | {t_sel:>10.1f} "
                  f"{microseconds(torch_select):>9.1f} | {gbps:>7.0f} {gbps / peak:>8.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False): run it on a GPU host "
              "with the CUDA builds of torch and triton", file=sys.stderr)
        return 2
    peak, source = peak_bandwidth()
    print(f"peak bandwidth {peak:.0f} GB/s from {source}")
    bench_attention(args, peak)
    bench_selection(args, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
