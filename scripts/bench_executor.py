#!/usr/bin/env python3
"""Time of the passes the decoding loops make, on the PyTorch executor at a release's size (random weights).

For each batch size: one causal pass of 1 token per sequence (an `ar` step), one block pass of B tokens (a
`dlm` denoising pass or the `linear_spec` draft), one causal pass of B tokens (the `linear_spec` verify),
after a prefill of --context tokens per sequence. With the fused Triton kernels (the default on CUDA) and
with the reference path (SDPA over a boolean mask); the ratio is from the same run. Random weights: the
times are those of the real model, the tokens are meaningless.

    python scripts/bench_executor.py --shape 8B --device cuda              # on a GPU host
    python scripts/bench_executor.py --shape tiny --device cpu --reps 2    # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

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


def random_model(shape: str, layers: int | None, device: str, dtype: torch.dtype, max_pos: int):
    from nld_trt.model import NLDModel, Rotary
    from nld_trt.tiny import tiny_config

    from dataclasses import replace

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
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pass(executor, slots, chunks, device: str, reps: int) -> float:
    """Median milliseconds of one uncommitted pass (the cache is unchanged by it, so reps are identical)."""
    executor.forward(slots, chunks, all_logits=False)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        executor.forward(slots, chunks, all_logits=False)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from nld_trt.executors import Chunk, TorchExecutor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8B")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the release (time scales with them)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence already in the cache")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU and the CUDA build of torch; use --device cpu for a smoke run",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    model = random_model(args.shape, args.layers, args.device, dtype, max_pos=65536)  # the cache is sized below
    config = model.config
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{args.shape} ({config.num_hidden_layers} layers, {config.num_parameters() / 1e9:.2f}B parameters), "
          f"{args.dtype}, {name}, context {args.context}, block {args.block}")
    variants = [("kernels", True), ("reference", False)] if args.device.startswith("cuda") else [("reference", False)]
    print(f"{'batch':>5} {'pass':<28} " + " ".join(f"{v + ' ms':>14}" for v, _ in variants)
          + ("   kernels/reference" if len(variants) == 2 else ""))
    rng = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = [torch.randint(200, config.vocab_size, (args.context,), generator=rng).tolist() for _ in range(batch)]
        mask = config.mask_token_id
        passes = {
            "ar step (causal, 1)": [Chunk([p[-1]]) for p in prompts],
            f"draft/denoise (block, {args.block})": [Chunk([p[-1]] + [mask] * (args.block - 1), block=True)
                                                     for p in prompts],
            f"verify (causal, {args.block})": [Chunk(p[-args.block:]) for p in prompts],
        }
        times = {}
        for label, kernels in variants:
            executor = TorchExecutor(model, max_batch=batch, max_seq_len=args.context + 2 * args.block + 8,
                                     max_chunk=max(args.block, args.context), kernels=kernels)
            slots = [executor.allocate() for _ in prompts]
            executor.forward(slots, [Chunk(p) for p in prompts], all_logits=False)
            for s in slots:
                executor.commit(s, args.context)
            for kind, chunks in passes.items():
                times[label, kind] = time_pass(executor, slots, chunks, args.device, args.reps)
            del executor
        for kind in passes:
            row = " ".join(f"{times[v, kind]:>14.2f}" for v, _ in variants)
            ratio = f"   {times['kernels', kind] / times['reference', kind]:>8.2f}" if len(variants) == 2 else ""
            print(f"{batch:>5} {kind:<28} {row}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
