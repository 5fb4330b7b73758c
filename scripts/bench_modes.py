#!/usr/bin/env python3
"""Tokens, NFE, TPF and tokens/s of each decoding mode on one model and prompt set, the ratios to ar from
the same run, and the same greedy AR workload through transformers' own generate() on the equivalent
Ministral3ForCausalLM (tokens compared, time as the ratio nld-trt / transformers)."""

from __future__ import annotations

import json
import time

import click
import torch


QUESTIONS = [
    "Tom has {a} apples and buys {b} more. How many apples does he have?",
    "A pack holds {a} pens. Sara buys {b} packs. How many pens does she have?",
    "Ann reads {a} pages a day for {b} days. How many pages does she read?",
    "A shirt costs {a} dollars and a hat costs {b} dollars. What do both cost?",
]


def transformers_twin(nld):
    """Ministral3ForCausalLM with the checkpoint's backbone and diffusion_head as lm_head."""
    from transformers import Ministral3ForCausalLM

    hf = Ministral3ForCausalLM(nld.config.to_transformers()).to(nld.dtype).eval()
    state = {("model." + k.removeprefix("encoder.")): v for k, v in nld.model.state_dict().items()
             if k.startswith("encoder.")}
    state["lm_head.weight"] = nld.model.diffusion_head.weight
    hf.load_state_dict(state, strict=True)
    hf.generation_config.eos_token_id = None  # same workload as ours: exactly max_new_tokens, EOS not special
    hf.generation_config.pad_token_id = nld.config.pad_token_id
    return hf.to(nld.model.diffusion_head.weight.device)


@click.command()
@click.option("--model", "model_dir", default=None, help="checkpoint (default: the embedded model)")
@click.option("--prompts", "n_prompts", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--block-length", type=int, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True, help="nld-trt batch size")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads on CPU")
@click.option("--json", "as_json", is_flag=True)
def main(model_dir, n_prompts, max_new_tokens, block_length, batch_size, device, threads, as_json) -> None:
    from rich.console import Console
    from rich.table import Table

    import nld_trt

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    nld = nld_trt.load(model_dir, device=device, max_batch=batch_size, max_seq_len=1024)
    texts = [QUESTIONS[i % len(QUESTIONS)].format(a=3 + i, b=2 + i % 5) for i in range(n_prompts)]
    prompts = [nld.encode(t) for t in texts]
    common = dict(max_new_tokens=max_new_tokens, block_length=block_length, eos_token_ids=())
    rows = {}
    nld.generate(prompts[:1], mode="ar", max_new_tokens=4)  # warm-up
    for mode in ("ar", "dlm", "linear_spec"):
        console.print(f"[dim]{mode}: {len(prompts)} prompts x {max_new_tokens} tokens...[/dim]")
        start = time.perf_counter()
        results = []
        for i in range(0, len(prompts), batch_size):
            results += nld.generate(prompts[i : i + batch_size], mode=mode, **common)
        wall = time.perf_counter() - start
        tokens = sum(r.stats.tokens for r in results)
        nfe = sum(r.stats.nfe for r in results)
        rows[mode] = {"tokens": tokens, "nfe": nfe, "tpf": tokens / nfe, "seconds": wall, "tokens_per_s": tokens / wall,
                      "ids": [r.token_ids for r in results]}
    console.print("[dim]transformers generate() on Ministral3ForCausalLM, greedy, batch 1...[/dim]")
    hf = transformers_twin(nld)
    hf.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    hf_ids = []
    with torch.inference_mode():
        for p in prompts:
            out = hf.generate(torch.tensor([p], device=device), max_new_tokens=max_new_tokens, do_sample=False)
            hf_ids.append(out[0, len(p):].tolist())
    hf_wall = time.perf_counter() - start
    hf_tokens = sum(len(x) for x in hf_ids)
    rows["transformers_ar"] = {"tokens": hf_tokens, "nfe": hf_tokens, "tpf": 1.0, "seconds": hf_wall,
                               "tokens_per_s": hf_tokens / hf_wall}
    same = sum(a == b for a, b in zip(rows["ar"]["ids"], hf_ids))
    spec_lossless = rows["linear_spec"]["ids"] == rows["ar"]["ids"]
    ratios = {
        "linear_spec/ar tokens_per_s": rows["linear_spec"]["tokens_per_s"] / rows["ar"]["tokens_per_s"],
        "dlm/ar tokens_per_s": rows["dlm"]["tokens_per_s"] / rows["ar"]["tokens_per_s"],
        "nld-trt ar/transformers ar tokens_per_s": rows["ar"]["tokens_per_s"] / hf_tokens * hf_wall,
    }
    for r in rows.values():
        r.pop("ids", None)
    summary = {"model": str(nld.path), "device": device, "threads": threads, "batch_size": batch_size,
               "prompts": len(prompts), "max_new_tokens": max_new_tokens, "rows": rows, "ratios": ratios,
               "ar_equals_transformers": f"{same}/{len(prompts)}", "linear_spec_equals_ar": spec_lossless}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"bench_modes: {nld.path.name}, {device}, batch {batch_size}, {threads} thread(s)")
    for col in ("mode", "tokens", "NFE", "TPF", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    for mode, r in rows.items():
        table.add_row(mode, str(r["tokens"]), str(r["nfe"]), f"{r['tpf']:.2f}", f"{r['seconds']:.2f}",
                      f"{r['tokens_per_s']:.1f}")
    Console().print(table)
    for k, v in ratios.items():
        click.echo(f"{k}: {v:.2f}")
    click.echo(f"greedy ar tokens equal to transformers: {same}/{len(prompts)}; linear_spec equals ar: {spec_lossless}")


if __name__ == "__main__":
    main()
