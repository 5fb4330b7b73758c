#!/usr/bin/env python3
"""Where self-speculation stops paying on a GPU, and what `auto` makes of it: a simulation of the 8B served
on an H200-class GPU at concurrency 1..256.

The planner is nld-trt's own (nld_trt/decoding/auto.py), run step by step over simulated requests; only the
forward passes are modelled. Cost model: a roofline from the H200's measured ceilings (device tool's KINDS.md:
copy ~4.3 TB/s, dense bf16 ~790 TFLOP/s) and the 8B's shape — a pass reads the weights (15.9 GB) and every row's
KV cache (139 KB per position), and computes 2 x 7.95 G FLOP per token plus the attention (it is the larger of
the two times, plus a launch floor). No GPU run has measured the 8B's pass times yet, so this is a roofline,
not a measurement (--cost FILE takes an `nld-trt calibrate` output instead). Acceptance: each request's
per-draft acceptance is drawn from the distribution measured on the embedded model (linear_spec, block 32, its
evaluation set; --acceptance measured), or set so that block-32 TPF is the 5.9 NLD-8B reports (--acceptance 8b).

Closed loop: `concurrency` requests are always in flight, each generating --tokens tokens after a prompt of
--prompt tokens; a finished one is replaced. Prints a table (tokens/s of ar, linear_spec at each block, auto)
and writes a plot.

Memory bounds the sweep as it bounds a deployment: the KV cache gets what the GPU (--gpu-gb, 141 GB for an
H200) leaves after the weights and a reserve for activations and CUDA graphs (--reserve-gb). With slots
(before pages) every sequence takes --max-seq-len positions, so only `slot capacity` requests run at once and
the rest wait; with pages of 16 a request takes what it uses (prompt + tokens + a block of look-ahead, rounded
up to pages), so the paged capacity is many times larger. Each level runs at min(concurrency, capacity);
the last column is auto with slots.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import click

BYTES_PER_PARAM = 2  # bf16
SHAPE_8B = dict(hidden=4096, intermediate=14336, layers=34, heads=32, kv_heads=8, head_dim=128, vocab=131072)


class Roofline:
    """Seconds of one pass of the 8B: max(bytes / bandwidth, flops / rate) + a launch floor."""

    def __init__(self, bandwidth: float = 4.3e12, flops: float = 790e12, floor: float = 30e-6) -> None:
        s = SHAPE_8B
        q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
        per_layer = 2 * s["hidden"] * q + 2 * s["hidden"] * kv + 3 * s["hidden"] * s["intermediate"]
        self.params = s["layers"] * per_layer + s["vocab"] * s["hidden"]  # the head; embeddings are gathered
        self.kv_bytes_per_key = 2 * s["layers"] * kv * BYTES_PER_PARAM
        self.attention_flops = 4 * s["layers"] * q  # per query-key pair: QK and PV
        self.bandwidth, self.flops, self.floor = bandwidth, flops, floor

    def pass_time(self, tokens: float, attention: float = 0.0, rows: float = 0.0, keys: float = 0.0) -> float:
        memory = (self.params * BYTES_PER_PARAM + keys * self.kv_bytes_per_key) / self.bandwidth
        compute = (2 * self.params * tokens + self.attention_flops * attention) / self.flops
        return max(memory, compute) + self.floor


def kv_capacity(gpu_gb: float, reserve_gb: float, max_seq_len: int, prompt: int, tokens: int, block: int = 32,
                page: int = 16) -> tuple[int, int, float, float]:
    """(requests at once with slots, with pages, KV GB, GB per slot) for the 8B on a GPU of gpu_gb."""
    roofline = Roofline()
    kv_bytes = (gpu_gb - reserve_gb) * 1e9 - roofline.params * BYTES_PER_PARAM
    slot = max_seq_len * roofline.kv_bytes_per_key
    pages = -(-(prompt + tokens + block) // page)
    return int(kv_bytes // slot), int(kv_bytes // (pages * page * roofline.kv_bytes_per_key)), kv_bytes / 1e9, slot / 1e9


def measured_acceptance(limit: int) -> list[float]:
    """Per-request draft acceptance of the embedded model: linear_spec, block 32, its evaluation set."""
    import torch

    import nld_trt
    from nld_trt.evaluate import load_task

    torch.set_num_threads(1)
    nld = nld_trt.load(max_batch=16, max_seq_len=512)
    questions = [p.question for p in load_task("gsm_synth")[:limit]]
    rates = []
    for i in range(0, len(questions), 16):
        for r in nld.generate(questions[i : i + 16], mode="linear_spec", block_length=32, max_new_tokens=128):
            steps = r.stats.accepted_per_step
            matched = sum(n - 1 for n in steps)
            rejected = sum(1 for n in steps if n < 32) - (1 if r.finish_reason != "length" else 0)  # the last is cut
            rates.append(matched / max(matched + max(rejected, 1), 1))
    return rates


def rate_for_tpf(tpf: float, block: int = 32) -> float:
    """The acceptance a for which a linear_spec step (draft + verify) yields tpf tokens per pass."""
    lo, hi = 0.0, 0.99999
    for _ in range(60):
        a = (lo + hi) / 2
        if (1 - a**block) / (1 - a) / 2 < tpf:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def simulate(cost, rates: list[float], concurrency: int, option: tuple[str, int] | None, prompt: int, tokens: int,
             steps: int, seed: int) -> tuple[float, dict[str, int]]:
    """Tokens per second of `concurrency` requests in a closed loop; option None: the auto planner decides."""
    from nld_trt.config import NLDConfig
    from nld_trt.decoding import GenerationParams
    from nld_trt.decoding.auto import AutoPlanner, AutoSequence

    config = NLDConfig(vocab_size=1000, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=8, mask_token_id=999, block_size=32)
    params = GenerationParams(mode="auto", max_new_tokens=tokens, block_length=32, eos_token_ids=()).resolved(config)
    planner = AutoPlanner(cost, force=None if option is None else (lambda seq, n: option))

    started = 0

    def new() -> AutoSequence:
        """Request k is the same request (its acceptance, its draft outcomes) whatever decodes it."""
        nonlocal started
        s = AutoSequence([1] * prompt, params, config, 0)
        s.rng = random.Random(seed * 1_000_003 + started)
        started += 1
        s.true_rate = s.rng.choice(rates)  # what its drafts really do; the planner only sees the outcomes
        s.out = [5]
        s.phase = 0
        return s

    active = [new() for _ in range(concurrency)]
    elapsed, generated = 0.0, 0
    for _ in range(steps):
        planner.plan(active)
        groups: dict[int, list[float]] = {}
        for s in active:
            b = s.chunk_length
            g = groups.setdefault(b, [0.0, 0.0, 0.0, 0.0])
            cache = prompt + len(s.out) - 1
            g[0] += b
            g[1] += b * (cache + b)
            g[2] += 1
            g[3] += cache + b
        elapsed += sum(cost.pass_time(*g) for g in groups.values())
        for i, s in enumerate(active):
            kind, b = s.option
            if kind == "ar":
                s.out.append(5)
                generated += 1
                s.option = None
            elif s.phase == 0:  # the draft pass
                s.phase = 1
            else:  # the verify pass
                matches = 0
                while matches < b - 1 and s.rng.random() < s.true_rate:
                    matches += 1
                s.out += [5] * (matches + 1)
                generated += matches + 1
                s.acceptance.observe(matches, b, 1)
                s.shared.observe(matches, b, 1, keep=0.98)
                s.phase, s.option = 0, None
            if len(s.out) >= tokens and s.option is None:
                active[i] = new()
    return generated / elapsed, dict(planner.mix)


@click.command()
@click.option("--acceptance", "source", type=click.Choice(["measured", "8b"]), default="measured", show_default=True)
@click.option("--limit", type=int, default=64, show_default=True, help="evaluation problems for --acceptance measured")
@click.option("--cost", "cost_file", type=click.Path(dir_okay=False), default=None,
              help="an `nld-trt calibrate` JSON (measured pass times) instead of the H200 roofline")
@click.option("--concurrency", default="1,2,4,8,16,32,48,64,96,128,192,256", show_default=True)
@click.option("--prompt", type=int, default=1024, show_default=True)
@click.option("--tokens", type=int, default=512, show_default=True)
@click.option("--steps", type=int, default=400, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default="docs/simulate_auto.png", show_default=True)
@click.option("--gpu-gb", type=float, default=141.0, show_default=True, help="GPU memory (H200: 141 GB)")
@click.option("--reserve-gb", type=float, default=10.0, show_default=True,
              help="left for activations, CUDA graphs and the allocator")
@click.option("--max-seq-len", type=int, default=32768, show_default=True, help="a slot's positions (before pages)")
def main(source, limit, cost_file, concurrency, prompt, tokens, steps, plot, gpu_gb, reserve_gb, max_seq_len) -> None:
    if cost_file:
        from nld_trt.executors.cost import CostModel

        cost, what = CostModel.from_json(json.loads(Path(cost_file).read_text())), f"measured ({cost_file})"
    else:
        cost, what = Roofline(), "H200 roofline (4.3 TB/s, 790 TFLOP/s measured ceilings; not measured on the 8B)"
    if source == "measured":
        rates = measured_acceptance(limit)
        origin = f"measured on the embedded model ({len(rates)} requests, mean {sum(rates) / len(rates):.3f})"
    else:
        rates = [rate_for_tpf(5.9)]
        origin = f"NLD-8B's reported block-32 TPF 5.9 (a = {rates[0]:.3f})"
    levels = [int(c) for c in concurrency.split(",")]
    slot_cap, page_cap, kv_gb, slot_gb = kv_capacity(gpu_gb, reserve_gb, max_seq_len, prompt, tokens)
    options = {"ar": ("ar", 1), **{f"linear_spec/{b}": ("linear_spec", b) for b in (4, 8, 16, 32)}, "auto": None}
    table = {name: [] for name in options}
    table["auto, slots"] = []
    mixes = []
    for c in levels:
        for name, option in options.items():
            rate, mix = simulate(cost, rates, min(c, page_cap), option, prompt, tokens, steps, seed=c)
            table[name].append(rate)
            if option is None:
                mixes.append(mix)
        running = min(c, slot_cap)  # with slots the rest wait
        table["auto, slots"].append(table["auto"][-1] if running == min(c, page_cap) else
                                    simulate(cost, rates, running, None, prompt, tokens, steps, seed=c)[0])
    print(f"cost: {what}\nacceptance: {origin}\nprompt {prompt}, {tokens} tokens per request, closed loop")
    print(f"KV memory: {gpu_gb:g} GB - {Roofline().params * BYTES_PER_PARAM / 1e9:.1f} GB of weights - {reserve_gb:g} GB "
          f"reserve = {kv_gb:.1f} GB, {Roofline().kv_bytes_per_key / 1e3:.0f} KB per position: slots of {max_seq_len} "
          f"positions ({slot_gb:.2f} GB) hold {slot_cap} requests at once; pages of 16 hold {page_cap} "
          f"({page_cap / slot_cap:.1f}x)\n")
    columns = [*options, "auto, slots"]
    print(f"{'concurrency':>11} " + " ".join(f"{n:>15}" for n in columns) + "  auto / best fixed  auto's mix")
    for i, c in enumerate(levels):
        best = max(table[n][i] for n in options if n != "auto")
        mix = ", ".join(f"{k} {100 * v / sum(mixes[i].values()):.0f}%" for k, v in sorted(mixes[i].items()))
        print(f"{c:>11} " + " ".join(f"{table[n][i]:15.0f}" for n in columns) + f"  {table['auto'][i] / best:17.2f}  {mix}")
    def crossing(names: list[str]) -> str:
        c = next((c for i, c in enumerate(levels) if table["ar"][i] >= max(table[n][i] for n in names)), None)
        return f"at concurrency {c}" if c else "at no concurrency simulated"

    print(f"\nar overtakes linear_spec at block 32 (the default) {crossing(['linear_spec/32'])}, and at its best "
          f"block {crossing([n for n in options if n.startswith('linear_spec')])} (NLD's report: the advantage "
          "disappears around 64 sessions on GB200, at a fixed block)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in columns:
        ax.plot(levels, table[name], marker="o", lw=2.5 if name == "auto" else 1.2, label=name,
                ls="--" if name == "auto, slots" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"NLD-8B on H200 (simulated): {origin.split(' (')[0]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
