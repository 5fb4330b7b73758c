#!/usr/bin/env python3
"""Tokens, NFE, TPF and tokens/s of each decoding mode on one model and prompt set, the ratios to ar from
the same run, and the same greedy AR workload through transformers' own generate() on the equivalent
Ministral3ForCausalLM (tokens compared, time as the ratio nld-trt / transformers). With --engine, every mode
also runs on an `nld-trt build` output of the same checkpoint (ONNX Runtime on CPU, the TensorRT plan with
--device cuda): tokens compared with the PyTorch executor's, time as a ratio."""

from __future__ import annotations

import json
import time

import click
import torch




def transformers_twin(nld):
    """Ministral3ForCausalLM with the checkpoint's backbone and diffusion_head as lm_head."""
    from transformers import Ministral3ForCausalLM

    hf = Ministral3ForCausalLM(nld.config.to_transformers()).to(nld.dtype).eval()
    state = {("model." + k.removeprefix("encoder.")): v for k, v in nld.model.state_dict().items()
             if k.startswith("encoder.")}
    state["lm_head.weight"] = nld.model.diffusion_head.weight
    hf.load_state_dict(state, strict=True)
    hf.generation_config.eos_token_id = nld.config.eos_token_id  # stop where ours stops
    hf.generation_config.pad_token_id = nld.config.pad_token_id
    return hf.to(nld.model.diffusion_head.weight.device)


@click.command()
@click.option("--model", "model_dir", default=None, help="checkpoint (default: the embedded model)")
@click.option("--tasks", default="gsm_synth", show_default=True, help="prompts: a built-in set or a JSONL file")
@click.option("--prompts", "n_prompts", type=int, default=16, show_default=True, help="the first N questions")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--block-length", type=int, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True, help="nld-trt batch size")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads on CPU")
@click.option("--engine", "engine_dir", default=None, help="an nld-trt build output of the same checkpoint")
@click.option("--json", "as_json", is_flag=True)
def main(model_dir, tasks, n_prompts, max_new_tokens, block_length, batch_size, device, threads, engine_dir, as_json) -> None:
    from rich.console import Console
    from rich.table import Table

    import nld_trt

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    nld = nld_trt.load(model_dir, device=device, max_batch=batch_size, max_seq_len=1024)
    from nld_trt.evaluate import load_task

    prompts = [nld.encode(p.question) for p in load_task(tasks)[:n_prompts]]
    common = dict(max_new_tokens=max_new_tokens, block_length=block_length)
    def run_modes(runtime, label: str) -> dict:
        out = {}
        runtime.generate(prompts[:1], mode="ar", max_new_tokens=4)  # warm-up
        for mode in ("ar", "dlm", "linear_spec"):
            console.print(f"[dim]{label} {mode}: {len(prompts)} prompts x {max_new_tokens} tokens...[/dim]")
            start = time.perf_counter()
            results = []
            for i in range(0, len(prompts), batch_size):
                results += runtime.generate(prompts[i : i + batch_size], mode=mode, **common)
            wall = time.perf_counter() - start
            tokens = sum(r.stats.tokens for r in results)
            nfe = sum(r.stats.nfe for r in results)
            out[label + mode] = {"tokens": tokens, "nfe": nfe, "tpf": tokens / nfe, "seconds": wall,
                                 "tokens_per_s": tokens / wall, "ids": [r.token_ids for r in results]}
        return out

    rows = run_modes(nld, "")
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
    engine_same = {}
    if engine_dir:
        engine = nld_trt.load(engine_dir, device=device, max_batch=batch_size, max_seq_len=1024)
        rows.update(run_modes(engine, "engine "))
        for mode in ("ar", "dlm", "linear_spec"):
            ratios[f"engine/pytorch {mode} tokens_per_s"] = rows["engine " + mode]["tokens_per_s"] / rows[mode]["tokens_per_s"]
            engine_same[mode] = f"{sum(a == b for a, b in zip(rows['engine ' + mode]['ids'], rows[mode]['ids']))}/{len(prompts)}"
    for r in rows.values():
        r.pop("ids", None)
    summary = {"model": str(nld.path), "device": device, "threads": threads, "batch_size": batch_size,
               "prompts": len(prompts), "max_new_tokens": max_new_tokens, "rows": rows, "ratios": ratios,
               "ar_equals_transformers": f"{same}/{len(prompts)}", "linear_spec_equals_ar": spec_lossless,
               "engine_equals_pytorch": engine_same}
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
    if engine_same:
        click.echo("engine tokens equal to the PyTorch executor: " + ", ".join(f"{m} {v}" for m, v in engine_same.items()))


if __name__ == "__main__":
    main()
