#!/usr/bin/env python3
"""Tokens, NFE, TPF and tokens/s of each decoding mode on one model and prompt set, on the PyTorch executor's
eager reference and on its compiled passes (torch.compile on CPU, CUDA graphs on a GPU), and the same greedy
AR workload through transformers' own generate() on the equivalent Ministral3ForCausalLM. Every ratio is from
this one run: the runs are interleaved batch by batch (eager, compiled, transformers, engine), so a noisy
machine slows them alike. Tokens are compared with the eager reference. With --engine, every mode also runs
on an `nld-trt build` output of the same checkpoint (ONNX Runtime on CPU, the TensorRT plan with --device
cuda).

With --temperature > 0 every mode samples (with --top-k/--top-p/--min-p, seed --seed + i per prompt), transformers
samples too (its tokens then differ: compare speed only), and linear_spec also runs with the reference's
equality acceptance (`linear_spec official`) beside the default speculative one, with the tokens accepted per
step of each."""

from __future__ import annotations

import json
import time

import click
import torch

MODES = ("ar", "dlm", "linear_spec")


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@click.command()
@click.option("--model", "model_dir", default=None, help="checkpoint (default: the embedded model)")
@click.option("--tasks", default="gsm_synth", show_default=True, help="prompts: a built-in set or a JSONL file")
@click.option("--prompts", "n_prompts", type=int, default=16, show_default=True, help="the first N questions")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--block-length", type=int, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True, help="nld-trt batch size")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads on CPU")
@click.option("--compiled/--no-compiled", default=True, show_default=True,
              help="also run the compiled passes (compiled at load: tens of seconds on CPU)")
@click.option("--engine", "engine_dir", default=None, help="an nld-trt build output of the same checkpoint")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="reuse cached prompt pages (each prompt runs in every mode, so later modes reuse it); off: "
                   "nothing is shared between runs")
@click.option("--json", "as_json", is_flag=True)
def main(model_dir, tasks, n_prompts, max_new_tokens, block_length, batch_size, device, threads, compiled, engine_dir,
         temperature, top_k, top_p, min_p, seed, prefix_cache, as_json) -> None:
    from rich.console import Console
    from rich.table import Table

    import nld_trt
    from nld_trt.evaluate import load_task

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    say = lambda line: console.print(f"[dim]{line}[/dim]")  # noqa: E731
    options = dict(device=device, max_batch=batch_size, max_seq_len=1024, progress=say, prefix_cache=prefix_cache)
    runtimes = {"eager": nld_trt.load(model_dir, compile=False, **options)}
    nld = runtimes["eager"]
    load_report = {}
    if compiled:
        start = time.perf_counter()
        runtimes["compiled"] = nld_trt.load(model_dir, compile=True, **options)
        load_report = {"compile_load_s": time.perf_counter() - start,
                       "compile_report": runtimes["compiled"].executor.compile_report}
    if engine_dir:
        runtimes["engine"] = nld_trt.load(engine_dir, **{k: v for k, v in options.items() if k != "progress"})
    say(f"KV cache: {nld.executor.layout.describe()}, prefix cache {'on' if prefix_cache else 'off'}")
    prompts = [nld.encode(p.question) for p in load_task(tasks)[:n_prompts]]
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    common = dict(max_new_tokens=max_new_tokens, block_length=block_length, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p)
    sampling = temperature > 0
    hf_sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p,
                       min_p=min_p or None) if sampling else dict(do_sample=False)

    console.print("[dim]transformers generate() on Ministral3ForCausalLM, greedy, batch 1[/dim]")
    hf = transformers_twin(nld)

    def hf_generate(batch):
        out = []
        with torch.inference_mode():
            for p in batch:
                ids = hf.generate(torch.tensor([p], device=device), max_new_tokens=max_new_tokens, **hf_sampling)
                out.append(ids[0, len(p):].tolist())
        return out

    for runtime in runtimes.values():  # warm-up
        runtime.generate(prompts[:1], mode="ar", max_new_tokens=4)
    hf_generate(prompts[:1])

    rows: dict[str, dict] = {}
    runs = [(mode, mode, {}) for mode in MODES]
    if sampling:  # the reference's acceptance rule beside ours
        runs.append(("linear_spec", "linear_spec official", {"acceptance": "official"}))
    for mode, name, extra in runs:
        console.print(f"[dim]{mode}: {len(prompts)} prompts x {max_new_tokens} tokens, batch {batch_size}, "
                      f"{' / '.join(runtimes)}{' / transformers' if mode == 'ar' else ''}...[/dim]")
        acc = {label: {"tokens": 0, "nfe": 0, "nfe_reference": 0, "seconds": 0.0, "ids": [], "steps": []}
               for label in runtimes}
        if mode == "ar" and not extra:
            acc["transformers"] = {"tokens": 0, "nfe": 0, "seconds": 0.0, "ids": []}
        for n, batch in enumerate(batches):
            for label, runtime in runtimes.items():
                sync(device)
                start = time.perf_counter()
                results = runtime.generate(batch, mode=mode, seed=seed + n * batch_size, **common, **extra)
                sync(device)
                a = acc[label]
                a["seconds"] += time.perf_counter() - start
                a["tokens"] += sum(r.stats.tokens for r in results)
                a["nfe"] += sum(r.stats.nfe for r in results)
                a["nfe_reference"] += sum(r.stats.nfe_reference for r in results)
                a["ids"] += [r.token_ids for r in results]
                a["steps"] += [k for r in results for k in r.stats.accepted_per_step]
            if "transformers" in acc:
                start = time.perf_counter()
                ids = hf_generate(batch)
                a = acc["transformers"]
                a["seconds"] += time.perf_counter() - start
                a["tokens"] += sum(len(x) for x in ids)
                a["nfe"] += sum(len(x) for x in ids)
                a["nfe_reference"] = a["nfe"]
                a["ids"] += ids
        for label, a in acc.items():
            a["tpf"] = a["tokens"] / a["nfe"]
            a["tpf_reference"] = a["tokens"] / a["nfe_reference"]
            a["tokens_per_s"] = a["tokens"] / a["seconds"]
            steps = a.pop("steps", [])
            a["accepted_per_step"] = sum(steps) / len(steps) if steps else None
            rows[f"{name} {label}"] = a

    speed = {k: r["tokens_per_s"] for k, r in rows.items()}
    ratios = {}
    for label in runtimes:
        ratios[f"ar {label} / transformers ar"] = speed[f"ar {label}"] / speed["ar transformers"]
        ratios[f"linear_spec {label} / ar {label}"] = speed[f"linear_spec {label}"] / speed[f"ar {label}"]
        ratios[f"dlm {label} / ar {label}"] = speed[f"dlm {label}"] / speed[f"ar {label}"]
    for label in runtimes:
        if label != "eager":
            for mode in MODES:
                ratios[f"{mode} {label} / {mode} eager"] = speed[f"{mode} {label}"] / speed[f"{mode} eager"]
    if sampling:
        ratios["linear_spec accepted per step, speculative / official (eager)"] = (
            rows["linear_spec eager"]["accepted_per_step"] / rows["linear_spec official eager"]["accepted_per_step"])
    reference = {name: rows[f"{name} eager"]["ids"] for _, name, _ in runs}
    same = {f"{name} {label}": f"{sum(a == b for a, b in zip(rows[f'{name} {label}']['ids'], reference[name]))}"
                               f"/{len(prompts)}"
            for _, name, _ in runs for label in (*runtimes, "transformers")
            if f"{name} {label}" in rows and label != "eager"}
    spec_lossless = reference["linear_spec"] == reference["ar"]
    for r in rows.values():
        r.pop("ids", None)
    summary = {"model": str(nld.path), "device": device, "threads": threads, "batch_size": batch_size,
               "prompts": len(prompts), "max_new_tokens": max_new_tokens, **load_report, "rows": rows,
               "ratios": ratios, "tokens_equal_to_eager": same, "linear_spec_equals_ar": spec_lossless}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"bench_modes: {nld.path.name}, {device}, batch {batch_size}, {threads} thread(s)")
    for col in ("mode", "runtime", "tokens", "NFE", "TPF", "TPF as the reference counts", "accepted / step",
                "seconds", "tokens/s", "tokens = eager"):
        table.add_column(col, justify="right")
    for key, r in rows.items():
        mode, label = key.rsplit(" ", 1)
        accepted = f"{r['accepted_per_step']:.2f}" if r["accepted_per_step"] else "-"
        table.add_row(mode, label, str(r["tokens"]), str(r["nfe"]), f"{r['tpf']:.2f}", f"{r['tpf_reference']:.2f}",
                      accepted, f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", same.get(key, "-"))
    Console(width=160).print(table)
    if load_report:
        click.echo(f"load: {load_report['compile_report']} ({load_report['compile_load_s']:.1f} s in all)")
    for k, v in ratios.items():
        click.echo(f"{k}: {v:.2f}")
    if not sampling:
        click.echo(f"greedy linear_spec equals greedy ar (eager): {spec_lossless}")


if __name__ == "__main__":
    main()
