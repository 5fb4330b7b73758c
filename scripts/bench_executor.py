#!/usr/bin/env python3
"""Time of the passes the decoding loops make, on the PyTorch executor at a release's size (random weights).

For each batch size: one causal pass of 1 token per sequence (an `ar` step), one block pass of B tokens (a
`dlm` denoising pass or the `linear_spec` draft), one causal pass of B tokens (the `linear_spec` verify),
after a prefill of --context tokens per sequence, in each variant of the executor:
- graphs: the static passes captured as CUDA graphs with the Triton kernels inside (compile=True on CUDA);
- compiled: the static passes compiled by torch.compile (compile=True on CPU);
- static: the same static passes, uncompiled;
- kernels: eager, the fused Triton kernels (compile=False on CUDA);
- reference: eager, SDPA over a boolean mask.
Ratios are from the same run. On CUDA it also prints what the issue's targets need: the 1-token pass at
batch 1 against the weight-read bound (bytes of the weights a pass reads / measured copy bandwidth), the
block pass against the 1-token pass, and transformers' own fast path (static cache + torch.compile, CUDA
graphs) per `ar` token at the same shape. Random weights: the times are those of the real model, the
tokens are meaningless.

    python scripts/bench_executor.py --shape 8B --device cuda              # on a GPU host
    python scripts/bench_executor.py --shape tiny --device cpu --reps 2    # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# From shared/spec/nld-model.md (8B as reported; 3B/14B follow the Ministral 3 family shapes).
SHAPES = {
    "3B": dict(hidden_size=3072, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=131072),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=131072),
    "14B": dict(hidden_size=5120, intermediate_size=16384, num_hidden_layers=40, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
}
# variant -> TorchExecutor keywords
VARIANTS = {
    "graphs": dict(kernels=True, compile="cuda-graphs"),
    "compiled": dict(kernels=False, compile="inductor"),
    "static": dict(kernels=False, compile="static"),
    "kernels": dict(kernels=True, compile=False),
    "reference": dict(kernels=False, compile=False),
}
DEFAULT_VARIANTS = {"cuda": "graphs,kernels,reference", "cpu": "static,reference"}
CUDA_MISSING = "--device cuda needs a CUDA GPU and the CUDA build of torch; use --device cpu for a smoke run"


def random_model(shape: str, layers: int | None, device: str, dtype: torch.dtype, max_pos: int):
    from dataclasses import replace

    from nld_trt.model import NLDModel, Rotary
    from nld_trt.tiny import tiny_config

    rope = replace(tiny_config().rope, original_max_position_embeddings=max_pos // 16)  # YaRN factor 16
    config = tiny_config(**{**SHAPES[shape], "max_position_embeddings": max_pos, "rope": rope,
                            **({"num_hidden_layers": layers} if layers else {})})
    with torch.device("meta"):
        model = NLDModel(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.rotary = Rotary(config).to(device)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_pass(executor, tables, chunks, device: str, reps: int) -> float:
    """Median milliseconds of one uncommitted pass after each table's committed tokens (the cache is unchanged
    by it, so reps are identical)."""
    from nld_trt.executors.base import PassBatch, PassRow

    batch = PassBatch([PassRow(c, t.length, t.pages) for t, c in zip(tables, chunks)], all_logits=False)
    return median_ms(lambda: executor.forward(batch), device, reps)


def weight_read_bound_ms(model) -> tuple[float, float, float]:
    """(bytes a 1-token pass reads for its weights, copy bandwidth in B/s, their ratio in ms). Every weight
    is read once, except the embedding table, of which a pass reads one row per token."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kernels import copy_bandwidth

    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    bandwidth = copy_bandwidth() * 1e9  # read + write bytes per second of a device-to-device copy
    return weights, bandwidth, weights / bandwidth * 1e3


def transformers_ms_per_token(model, batch: int, context: int, new: int, compiled: bool, device: str,
                              reps: int) -> float:
    """transformers' generate() on the same weights (Ministral3ForCausalLM, static KV cache; `compiled`:
    its own torch.compile of the decode step, CUDA graphs on a GPU): ms per decoded token, i.e. the time
    of `new` tokens minus that of 1, over new - 1."""
    from transformers import CompileConfig, Ministral3ForCausalLM, StaticCache

    with torch.device("meta"):
        hf = Ministral3ForCausalLM(model.config.to_transformers())
    state = {("model." + k.removeprefix("encoder.")): v for k, v in model.state_dict().items()
             if k.startswith("encoder.")}
    state["lm_head.weight"] = model.diffusion_head.weight
    hf.load_state_dict(state, strict=True, assign=True)  # the same tensors: no second copy of the weights
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(device)  # its buffers were on meta
    hf.eval()
    ids = torch.randint(200, model.config.vocab_size, (batch, context), device=device)

    def generate(n: int):
        cache = StaticCache(config=hf.config, max_cache_len=context + new + 8)
        with torch.inference_mode():
            hf.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, disable_compile=not compiled,
                        compile_config=CompileConfig(fullgraph=True) if compiled else None)

    generate(new)  # compiles and captures
    full, one = median_ms(lambda: generate(new), device, reps), median_ms(lambda: generate(1), device, reps)
    return (full - one) / (new - 1)


def main(argv: list[str] | None = None) -> int:
    from nld_trt.executors import Chunk, TorchExecutor
    from nld_trt.executors.base import PassBatch, PassRow
    from nld_trt.kv import PageManager, PageTable

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8B")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the release (time scales with them)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence already in the cache")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, first is the one the ratios are of: {', '.join(VARIANTS)} "
                         f"(default: {DEFAULT_VARIANTS['cuda']} on CUDA, {DEFAULT_VARIANTS['cpu']} on CPU)")
    ap.add_argument("--transformers", choices=["none", "eager", "compiled"], default=None,
                    help="transformers' generate() with a static cache, eager or torch.compiled "
                         "(default: compiled on CUDA, none on CPU)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per transformers generate() run")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(CUDA_MISSING, file=sys.stderr)
        return 2
    variants = (args.variants or DEFAULT_VARIANTS["cuda" if cuda else "cpu"]).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or ("graphs" in variants and not cuda) or ("kernels" in variants and not cuda):
        print(f"variants {variants}: choose from {', '.join(VARIANTS)}; graphs and kernels need --device cuda",
              file=sys.stderr)
        return 2
    hf_mode = args.transformers or ("compiled" if cuda else "none")
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    model = random_model(args.shape, args.layers, args.device, dtype, max_pos=65536)  # the cache is sized below
    config = model.config
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.shape} ({config.num_hidden_layers} layers, {config.num_parameters() / 1e9:.2f}B parameters), "
          f"{args.dtype}, {name}, torch {torch.__version__}, context {args.context}, block {args.block}")
    bound = None
    if cuda:
        weights, bandwidth, bound = weight_read_bound_ms(model)
        print(f"weights read per 1-token pass {weights / 1e9:.2f} GB, device copy bandwidth {bandwidth / 1e12:.2f} TB/s "
              f"(read + write): weight-read bound {bound:.3f} ms")
    ratio_head = f"   {variants[0]}/{variants[-1]}" if len(variants) > 1 else ""
    print(f"{'batch':>5} {'pass':<28} " + " ".join(f"{v + ' ms':>14}" for v in variants) + ratio_head)
    rng = torch.Generator().manual_seed(0)
    ar_label, block_label = "ar step (causal, 1)", f"draft/denoise (block, {args.block})"
    summary: list[str] = []
    for batch in batches:
        prompts = [torch.randint(200, config.vocab_size, (args.context,), generator=rng).tolist() for _ in range(batch)]
        mask = config.mask_token_id
        passes = {
            ar_label: [Chunk([p[-1]]) for p in prompts],
            block_label: [Chunk([p[-1]] + [mask] * (args.block - 1), block=True) for p in prompts],
            f"verify (causal, {args.block})": [Chunk(p[-args.block:]) for p in prompts],
        }
        times = {}
        for variant in variants:
            executor = TorchExecutor(model, max_batch=batch, max_seq_len=args.context + 2 * args.block + 8,
                                     max_chunk=max(args.block, args.context), chunk_lens=(1, args.block),
                                     batch_buckets=(batch,), **VARIANTS[variant])
            if executor.compile_report:
                summary.append(f"batch {batch} {variant}: {executor.compile_report}")
            pages = PageManager(executor.layout.pages, executor.layout.page_size)
            tables = [PageTable() for _ in prompts]
            for t, p in zip(tables, prompts):  # room for the prompt and the longest chunk after it
                pages.grow(t, len(p) + args.block)
            executor.forward(PassBatch([PassRow(Chunk(p), 0, t.pages) for t, p in zip(tables, prompts)], False))
            for t, p in zip(tables, prompts):
                pages.commit(t, p)
            for kind, chunks in passes.items():
                times[variant, kind] = time_pass(executor, tables, chunks, args.device, args.reps)
            del executor
            if cuda:
                torch.cuda.empty_cache()
        for kind in passes:
            row = " ".join(f"{times[v, kind]:>14.3f}" for v in variants)
            ratio = f"   {times[variants[0], kind] / times[variants[-1], kind]:>8.2f}" if len(variants) > 1 else ""
            print(f"{batch:>5} {kind:<28} {row}{ratio}")
        fast = variants[0]
        ar_ms = times[fast, ar_label]
        summary.append(f"batch {batch} {fast}: {args.block}-token block pass / 1-token pass = "
                       f"{times[fast, block_label] / ar_ms:.2f} (target <= 1.3 at batch 1)")
        if bound is not None and batch == 1:
            summary.append(f"batch 1 {fast}: 1-token pass / weight-read bound = {ar_ms / bound:.2f} (target <= 1.2)")
        if hf_mode != "none":
            hf_ms = transformers_ms_per_token(model, batch, args.context, args.new_tokens, hf_mode == "compiled",
                                              args.device, max(3, args.reps // 5))
            summary.append(f"batch {batch}: transformers generate() static cache ({hf_mode}) {hf_ms:.3f} ms per ar "
                           f"token; nld-trt {fast} ar step {ar_ms:.3f} ms: nld-trt is {hf_ms / ar_ms:.2f}x as fast")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
