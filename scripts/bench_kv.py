#!/usr/bin/env python3
"""What the paged KV cache and prefix caching buy, in-process through the continuous-batching scheduler's
batcher (nld_trt/decoding/driver.py), on the embedded model (or --model). One run each: compare figures from
the same run only.

capacity: in the KV memory of 8 full-length sequences (8 x max_seq_len positions, what 8 slots took before
  pages), how many requests drawn like the evaluation set (its questions, max_new_tokens) decode at once,
  and the generated tokens/s, against the same pool limited to 8 sequences (the slot deployment).
multiturn: 16 conversations x 4 turns sharing a 1,000-token system prompt (each turn: the system prompt,
  the earlier questions and answers, the next question, through the chat template), all conversations'
  turn t submitted together; per mode, with the prefix cache on and off: prompt tokens computed by prefills
  and time to first token (submission to the first token, in-process).

    python scripts/bench_kv.py capacity [--mode linear_spec] [--requests 128] [--max-new-tokens 128]
    python scripts/bench_kv.py multiturn [--modes ar,dlm,linear_spec,auto] [--max-new-tokens 64]
"""

from __future__ import annotations

import statistics
import sys
import time

import click
import torch


def questions(n: int, tasks: str = "gsm_synth") -> list[str]:
    from nld_trt.evaluate import load_task

    problems = load_task(tasks)
    return [problems[i % len(problems)].question for i in range(n)]


def decode_all(nld, prompts: list[list[int]], mode: str, max_new_tokens: int, planner=None):
    """Every prompt submitted at once to one batcher on `nld`'s executor and pages; returns (sequences, wall
    seconds, peak sequences decoding together, time to first token per sequence)."""
    from nld_trt.decoding import SEQUENCE_TYPES, Batcher, GenerationParams

    params = GenerationParams(mode=mode, max_new_tokens=max_new_tokens).resolved(nld.config)
    seqs = [SEQUENCE_TYPES[mode](p, params, nld.config, 0, nld.tokenizer.decode) for p in prompts]
    first: dict[int, float] = {}

    def on_step(s) -> None:
        if s.out and id(s) not in first:
            first[id(s)] = time.perf_counter()

    batcher = Batcher(nld.executor, on_step=on_step, planner=planner, pages=nld.pages)
    start = time.perf_counter()
    for s in seqs:
        batcher.submit(s)
    peak = 0
    while not batcher.idle:
        batcher.step()
        peak = max(peak, len(batcher.active))
    wall = time.perf_counter() - start
    failed = [s.error for s in seqs if s.error]
    if failed:
        raise SystemExit(f"a request failed: {failed[0]}")
    return seqs, wall, peak, [first[id(s)] - start for s in seqs]


@click.group()
@click.option("--model", "model_dir", default=None, help="checkpoint (default: the embedded model)")
@click.option("--threads", type=int, default=1, show_default=True)
@click.pass_context
def cli(ctx, model_dir, threads) -> None:
    torch.set_num_threads(threads)
    ctx.obj = model_dir


@cli.command()
@click.option("--mode", default="linear_spec", show_default=True)
@click.option("--requests", "n_requests", type=int, default=128, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--max-batch", type=int, default=256, show_default=True, help="the paged deployment's sequence cap")
@click.pass_obj
def capacity(model_dir, mode, n_requests, max_new_tokens, max_seq_len, max_batch) -> None:
    """Sequences at once and tokens/s in the memory of 8 full-length slots: paged vs 8 sequences."""
    import nld_trt

    pool = 8 * max_seq_len
    texts = questions(n_requests)
    rows = []
    for label, batch in (("8 sequences (the slot deployment's memory and count)", 8),
                         (f"paged, up to {max_batch} sequences", max_batch)):
        nld = nld_trt.load(model_dir, max_batch=batch, max_seq_len=max_seq_len, kv_cache_tokens=pool,
                           prefix_cache=False)  # distinct requests: no reuse, capacity alone
        prompts = [nld.encode(t) for t in texts]
        planner = nld.planner if mode == "auto" else None
        if planner is not None:
            planner.model  # calibrated before the timed run
        seqs, wall, peak, _ = decode_all(nld, prompts, mode, max_new_tokens, planner)
        tokens = sum(len(s.out) for s in seqs)
        rows.append((label, peak, tokens / wall, nld.pages.stats.preemptions))
        print(f"{label}: peak {peak} sequences decoding at once, {tokens} tokens in {wall:.1f} s = "
              f"{tokens / wall:.1f} tokens/s, {nld.pages.stats.preemptions} preemptions", file=sys.stderr)
    layout = nld.executor.layout
    prompt_lens = [len(p) for p in prompts]
    print(f"\ncapacity: {n_requests} requests ({mode}, max_new_tokens {max_new_tokens}, prompts "
          f"{statistics.mean(prompt_lens):.0f} tokens on average), a pool of {pool} KV positions "
          f"({layout.pages} pages of {layout.page_size}, {layout.nbytes / 2**20:.1f} MiB: 8 x max_seq_len {max_seq_len})")
    print(f"{'deployment':<55} {'peak sequences':>15} {'tokens/s':>10} {'preemptions':>12}")
    for label, peak, rate, pre in rows:
        print(f"{label:<55} {peak:>15} {rate:>10.1f} {pre:>12}")
    print(f"paged / 8: {rows[1][1] / rows[0][1]:.2f}x the sequences (target >= 4), "
          f"{rows[1][2] / rows[0][2]:.2f}x the tokens/s")


SYSTEM_WORDS = ("You are a patient and careful mathematics tutor. For every problem, restate what is given, work "
                "through each step in order, check the arithmetic, and finish with the final number alone. ")


@cli.command()
@click.option("--modes", default="ar,dlm,linear_spec,auto", show_default=True)
@click.option("--conversations", type=int, default=16, show_default=True)
@click.option("--turns", type=int, default=4, show_default=True)
@click.option("--system-tokens", type=int, default=1000, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.pass_obj
def multiturn(model_dir, modes, conversations, turns, system_tokens, max_new_tokens) -> None:
    """Prefill tokens and time to first token of multi-turn chats sharing a system prompt, cache on vs off."""
    import nld_trt

    kw = dict(max_batch=conversations, max_seq_len=4096)
    runtimes = {"on": nld_trt.load(model_dir, **kw), "off": nld_trt.load(model_dir, prefix_cache=False, **kw)}
    tok = runtimes["on"].tokenizer
    system = SYSTEM_WORDS
    while len(tok.encode(system)) < system_tokens:
        system += SYSTEM_WORDS
    while len(tok.encode(system)) > system_tokens:
        system = system[: system.rstrip().rfind(" ")]
    qs = questions(conversations + turns)
    results = {}
    for mode in modes.split(","):
        for cache, nld in runtimes.items():
            nld.pages.clear()  # each run starts from an empty cache
            planner = nld.planner if mode == "auto" else None
            if planner is not None:
                planner.model
            history = [[{"role": "system", "content": system}] for _ in range(conversations)]
            computed = prompt_total = 0
            ttft: list[float] = []
            outputs = []
            for t in range(turns):
                for i, h in enumerate(history):
                    h.append({"role": "user", "content": qs[i + t]})
                prompts = [tok.encode_chat(h) for h in history]
                seqs, _, _, first = decode_all(nld, prompts, mode, max_new_tokens, planner)
                computed += sum(s.stats.prefill_tokens for s in seqs)
                prompt_total += sum(len(p) for p in prompts)
                ttft += first
                outputs += [s.out for s in seqs]
                for h, s in zip(history, seqs):
                    h.append({"role": "assistant", "content": s.text()})
            results[mode, cache] = (computed, prompt_total, statistics.mean(ttft), statistics.median(ttft), outputs)
            print(f"{mode} cache {cache}: {computed} of {prompt_total} prompt tokens computed, TTFT mean "
                  f"{1e3 * statistics.mean(ttft):.1f} ms", file=sys.stderr)
    print(f"\nmultiturn: {conversations} conversations x {turns} turns, a {len(tok.encode(system))}-token system "
          f"prompt, max_new_tokens {max_new_tokens}; each turn's {conversations} requests submitted together")
    print(f"{'mode':<12} {'prefill tokens on / off':>26} {'ratio':>7} {'TTFT mean on / off ms':>24} "
          f"{'TTFT p50 on / off ms':>22} {'same tokens':>12}")
    for mode in modes.split(","):
        on, off = results[mode, "on"], results[mode, "off"]
        same = sum(a == b for a, b in zip(on[4], off[4]))
        print(f"{mode:<12} {on[0]:>12} / {off[0]:<11} {on[0] / off[0]:>7.1%} {1e3 * on[2]:>11.1f} / {1e3 * off[2]:<10.1f} "
              f"{1e3 * on[3]:>10.1f} / {1e3 * off[3]:<9.1f} {same:>5}/{len(on[4])}")


if __name__ == "__main__":
    cli()
