#!/usr/bin/env python3
"""Images in decoding: per mode, tokens, NFE, TPF, prefill time and tokens/s with one image per request
against the same questions without it, and the vision encoder's time per image size.

The model is a vision-language checkpoint (`--model DIR`) or a random one built for the run (`--random tiny`:
the tests' tiny VLM; `--random 8b-tower`: the Nemotron-Labs-Diffusion-VLM-8B's vision tower shape, 24 layers
of width 1024, intermediate 4096, 16 heads, patch 14, in front of the tiny text model). Runs with and without
images are interleaved batch by batch, so a busy machine slows both alike; every ratio is within this run.
tokens/s counts generated tokens over the decode time (prefill, which includes encoding the images, is
reported apart). The encode table times a fresh (uncached) encoder on each image size, then a cache hit.
Random weights make TPF meaningless as a quality figure: what the run shows is what an image costs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

MODES = ("ar", "dlm", "linear_spec")
TOWER_8B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                hidden_act="silu")


def random_checkpoint(kind: str, directory: Path, say) -> Path:
    from nld_trt.tiny import make_tiny_vlm_checkpoint

    if kind == "tiny":
        return make_tiny_vlm_checkpoint(directory / "tiny-vlm", seed=3, std=0.15)
    if kind == "8b-tower":
        say("building a random VLM with the 8B's vision tower (about 400M parameters)")
        return make_tiny_vlm_checkpoint(directory / "vlm-8b-tower", seed=3, std=0.15, vision_std=0.02, vision=TOWER_8B)
    raise click.BadParameter(f"--random must be tiny or 8b-tower, got {kind!r}")


def picture(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, _, h = item.strip().partition("x")
        out.append((int(w), int(h or w)))
    return out


@click.command()
@click.option("--model", "model_dir", default=None, help="a vision-language checkpoint")
@click.option("--random", "random_kind", default="tiny", show_default=True,
              help="without --model: build a random VLM, tiny or 8b-tower")
@click.option("--prompts", "n_prompts", type=int, default=8, show_default=True, help="questions (evaluation set)")
@click.option("--image-size", default="448x336", show_default=True, help="the image each request carries (WxH)")
@click.option("--encode-sizes", default="224,448,672", show_default=True, help="image sizes to time the encoder on")
@click.option("--encode-reps", type=int, default=3, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--block-length", type=int, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads on CPU")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(model_dir, random_kind, n_prompts, image_size, encode_sizes, encode_reps, max_new_tokens, block_length,
         batch_size, threads, device, as_json) -> None:
    from rich.console import Console
    from rich.table import Table

    import nld_trt
    from nld_trt.evaluate import load_task
    from nld_trt.vision.encoder import ImageEncoder

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    say = lambda line: console.print(f"[dim]{line}[/dim]")  # noqa: E731
    scratch = tempfile.TemporaryDirectory(prefix="bench-images-")
    path = Path(model_dir) if model_dir else random_checkpoint(random_kind, Path(scratch.name), say)
    nld = nld_trt.load(path, device=device, max_batch=batch_size, max_seq_len=4096, progress=say)
    if nld.vlm is None:
        raise click.BadParameter(f"{path} is not a vision-language checkpoint", param_hint="--model")
    v = nld.vlm.vision
    tower = f"{v.num_hidden_layers} x {v.hidden_size} (intermediate {v.intermediate_size}, {v.num_attention_heads} heads)"

    # the encoder, per image size ---------------------------------------------------------------------
    encode_rows = []
    for w, h in parse_sizes(encode_sizes):
        prepared = nld.prompts.processor.prepare(picture(w, h, w * 7 + h), "bench image")
        times = []
        for _ in range(encode_reps):
            fresh = ImageEncoder(nld.image_encoder.encoder, nld.image_encoder.dtype, nld.image_encoder.device)
            start = time.perf_counter()
            fresh.rows([prepared])
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh.rows([prepared])
        hit = time.perf_counter() - start
        rows, cols = prepared.grid
        encode_rows.append({"size": f"{w}x{h}", "resized": f"{cols * nld.vlm.cell}x{rows * nld.vlm.cell}",
                            "patches": rows * cols * nld.vlm.spatial_merge_size ** 2, "cells": rows * cols,
                            "positions": prepared.positions, "encode_ms": 1e3 * statistics.median(times),
                            "cached_ms": 1e3 * hit})
        say(f"encode {w}x{h}: {encode_rows[-1]['encode_ms']:.1f} ms")

    # decoding with and without an image ------------------------------------------------------------------
    iw, ih = parse_sizes(image_size)[0]
    questions = [p.question for p in load_task("gsm_synth")[:n_prompts]]
    requests = {
        "text": questions,
        "image": [[{"role": "user", "content": [{"type": "image", "image": picture(iw, ih, i)},
                                                {"type": "text", "text": q}]}] for i, q in enumerate(questions)],
    }
    nld.generate(requests["image"][:1], mode="ar", max_new_tokens=2)  # warm-up
    common = dict(max_new_tokens=max_new_tokens, block_length=block_length, eos_token_ids=())
    table_rows = {}
    for mode in MODES:
        say(f"{mode}: {n_prompts} prompts x {max_new_tokens} tokens, with and without an image")
        acc = {k: {"tokens": 0, "nfe": 0, "prompt_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0} for k in requests}
        for start in range(0, n_prompts, batch_size):
            for kind, prompts in requests.items():
                nld.image_encoder.clear()  # every request pays its image, as a new image would
                results = nld.generate(prompts[start: start + batch_size], mode=mode, **common)
                a = acc[kind]
                a["tokens"] += sum(r.stats.tokens for r in results)
                a["nfe"] += sum(r.stats.nfe for r in results)
                a["prompt_tokens"] += sum(len(r.prompt_token_ids) for r in results)
                a["prefill_s"] += results[0].stats.prefill_s  # one prefill per batch
                a["decode_s"] += max(r.stats.decode_s for r in results)
        for kind, a in acc.items():
            a["tpf"] = a["tokens"] / a["nfe"]
            a["tokens_per_s"] = a["tokens"] / a["decode_s"]
            a["prompt_tokens"] /= n_prompts
            table_rows[f"{mode} {kind}"] = a
    ratios = {f"{mode} tokens/s, image / text": table_rows[f"{mode} image"]["tokens_per_s"]
              / table_rows[f"{mode} text"]["tokens_per_s"] for mode in MODES}
    ratios.update({f"{mode} prefill, image / text": table_rows[f"{mode} image"]["prefill_s"]
                   / table_rows[f"{mode} text"]["prefill_s"] for mode in MODES})
    summary = {"model": str(path) if model_dir else f"random {random_kind}", "tower": tower, "device": device,
               "threads": threads, "batch_size": batch_size, "prompts": n_prompts, "image_size": image_size,
               "max_new_tokens": max_new_tokens, "encode": encode_rows, "rows": table_rows, "ratios": ratios}
    scratch.cleanup()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    t = Table(title=f"vision encoder ({tower}), {device}, {threads} thread(s)")
    for col in ("image", "resized", "patches", "image tokens", "prompt positions", "encode ms", "cached ms"):
        t.add_column(col, justify="right")
    for r in encode_rows:
        t.add_row(r["size"], r["resized"], str(r["patches"]), str(r["cells"]), str(r["positions"]),
                  f"{r['encode_ms']:.1f}", f"{r['cached_ms']:.3f}")
    Console(width=160).print(t)
    t = Table(title=f"decoding with one {image_size} image per request vs without ({summary['model']})")
    for col in ("mode", "prompt", "prompt tokens", "tokens", "NFE", "TPF", "prefill s", "decode s", "tokens/s"):
        t.add_column(col, justify="right")
    for key, r in table_rows.items():
        mode, kind = key.rsplit(" ", 1)
        t.add_row(mode, kind, f"{r['prompt_tokens']:.0f}", str(r["tokens"]), str(r["nfe"]), f"{r['tpf']:.2f}",
                  f"{r['prefill_s']:.3f}", f"{r['decode_s']:.2f}", f"{r['tokens_per_s']:.1f}")
    Console(width=160).print(t)
    for k, value in ratios.items():
        click.echo(f"{k}: {value:.2f}")


if __name__ == "__main__":
    main()
