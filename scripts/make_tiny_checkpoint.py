#!/usr/bin/env python3
"""Write a tiny random NLD checkpoint in the release layout (config, safetensors, tokenizer, chat template,
linear_spec_lora/). For tests and smoke runs; the embedded default model is the trained one. --vlm writes a
vision-language one (the Nemotron-Labs-Diffusion-VLM layout: a small Pixtral tower and projector beside it)."""

from __future__ import annotations

import click

from nld_trt.tiny import make_tiny_checkpoint, make_tiny_vlm_checkpoint


@click.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--std", type=float, default=0.15, show_default=True, help="weight init std")
@click.option("--shards", type=int, default=1, show_default=True)
@click.option("--lora-rank", type=int, default=4, show_default=True, help="0: no draft adapter")
@click.option("--dlm-type", type=click.Choice(["llada", "dream"]), default="llada", show_default=True)
@click.option("--vlm", is_flag=True, help="a vision-language checkpoint (one shard)")
@click.option("--overwrite", is_flag=True)
def main(output, seed, std, shards, lora_rank, dlm_type, vlm, overwrite) -> None:
    if vlm:
        if shards != 1:
            raise click.BadParameter("a --vlm checkpoint is written in one shard", param_hint="--shards")
        path = make_tiny_vlm_checkpoint(output, seed=seed, std=std, lora_rank=lora_rank or None, overwrite=overwrite,
                                        dlm_type=dlm_type)
    else:
        path = make_tiny_checkpoint(output, seed=seed, std=std, lora_rank=lora_rank or None, shards=shards,
                                    overwrite=overwrite, dlm_type=dlm_type)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
