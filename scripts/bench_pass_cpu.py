#!/usr/bin/env python3
"""Process CPU time of one eager PyTorch-executor pass of the embedded model, per batch size and chunk length.

CPU time, not wall time: on a machine other jobs share, wall-clock figures of two runs drift by tens of
percent, while the CPU time this process spends on a pass is what a regression would change. It runs against
whichever nld-trt its interpreter imports, the paged executor or the slot executor that came before pages (it
detects which), so a before/after comparison is the same file run by each checkout's Python, alternately:

    (cd OLD_CHECKOUT && .venv/bin/python NEW_CHECKOUT/scripts/bench_pass_cpu.py)
    .venv/bin/python scripts/bench_pass_cpu.py

Passes: every row is an uncommitted pass after `--context` committed positions (the cache is unchanged by it,
so repetitions are identical); the figure is the best of --blocks blocks of --reps passes. The whole loop: the
first 8 evaluation questions through `NLD.generate` one at a time (batch 1, 128 tokens, no EOS, nothing shared
between requests), CPU time per forward pass, best of 3.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--shapes", default="1x1,1x32,8x1,8x32", help="batch x chunk length")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import nld_trt
    from nld_trt.executors import Chunk

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    nld = nld_trt.load(max_batch=max(b for b, _ in shapes), max_seq_len=1024)
    ex = nld.executor
    paged = hasattr(ex, "layout")
    ctx = args.context

    def setup(b: int):
        """A pass function over b sequences of ctx committed positions."""
        prompt = Chunk(list(range(5, 5 + ctx)))
        if paged:
            from nld_trt.executors.base import PassBatch, PassRow
            from nld_trt.kv import PageTable

            tables = []
            for _ in range(b):
                t = PageTable()
                nld.pages.grow(t, ctx + 64)
                tables.append(t)
            ex.forward(PassBatch([PassRow(prompt, 0, t.pages) for t in tables], False))
            return (lambda c: ex.forward(PassBatch([PassRow(c, ctx, t.pages) for t in tables]))), \
                (lambda: [nld.pages.release(t) for t in tables])
        slots = [ex.allocate() for _ in range(b)]
        ex.forward(slots, [prompt] * b, all_logits=False)
        for s in slots:
            ex.commit(s, ctx)
        return (lambda c: ex.forward(slots, [c] * b)), (lambda: [ex.release(s) for s in slots])

    print(f"{'paged' if paged else 'slots'} executor, {nld.path.name}, context {ctx}: ms of process CPU time per pass")
    for b, n in shapes:
        run, done = setup(b)
        chunk = Chunk([7] * n, block=n > 1)
        for _ in range(10):
            run(chunk)
        best = float("inf")
        for _ in range(args.blocks):
            start = time.process_time()
            for _ in range(args.reps):
                run(chunk)
            best = min(best, (time.process_time() - start) / args.reps * 1e3)
        done()
        print(f"batch {b:>2} x chunk {n:>2}: {best:.3f} ms")
    whole_loop(paged)


def whole_loop(paged: bool) -> None:
    import nld_trt
    from nld_trt.evaluate import load_task

    nld = nld_trt.load(max_batch=1, max_seq_len=1024, **({"prefix_cache": False} if paged else {}))
    prompts = [nld.encode(p.question) for p in load_task("gsm_synth")[:8]]
    nld.generate(prompts[0], mode="ar", max_new_tokens=8)
    for mode in ("ar", "linear_spec"):
        best = float("inf")
        for _ in range(3):
            start, passes = time.process_time(), 0
            for p in prompts:
                passes += nld.generate(p, mode=mode, max_new_tokens=128, eos_token_ids=()).stats.nfe
            best = min(best, (time.process_time() - start) / passes * 1e3)
        print(f"whole loop, {mode}: {best:.3f} ms per pass")


if __name__ == "__main__":
    main()
