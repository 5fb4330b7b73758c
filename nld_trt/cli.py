"""`nld-trt`: the command line. Errors print one line that says what to fix, and exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_support import MODEL_HELP, console as _console, kv_kwargs, kv_options, nfe_phrase, run_command
from .config import DEFAULT_PAGE_SIZE
from .errors import NLDError
from .training.pictures import KINDS as PICTURE_KINDS, SAMPLE_KIND

GENERATE_MODEL_HELP = "checkpoint directory (default: the embedded tiny NLD model; with --image the embedded tiny VLM)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nld-trt")
def cli() -> None:
    """Nemotron-Labs-Diffusion from checkpoint to served engine: every decoding mode from one deployment."""


@cli.command()
@click.argument("prompt")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=GENERATE_MODEL_HELP)
@click.option("--mode", default="ar", show_default=True, help="ar | dlm | linear_spec | auto")
@click.option("--block-length", type=int, default=None, help="block length B (default: the checkpoint's block_size)")
@click.option("--threshold", type=float, default=None, help="confidence threshold (default 0.9 dlm, 0.0 linear_spec)")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy")
@click.option("--top-k", type=int, default=0, show_default=True, help="sampling: keep the k most likely tokens (0: off)")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="sampling: nucleus mass (1: off)")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="sampling: drop tokens under min-p x the top one")
@click.option("--stop", multiple=True, help="stop string (repeatable): the text ends just before the first one")
@click.option("--bad-word", "bad_words", multiple=True,
              help="banned word (repeatable): no output completes it (encoded as it is: ' apples' differs from 'apples')")
@click.option("--prompt-logprobs", type=int, default=None, help="print each prompt token's log-probability and the "
              "N likeliest others (0-20)")
@click.option("--min-tokens", type=int, default=0, show_default=True, help="no EOS before this many tokens")
@click.option("--logprobs", is_flag=True, help="print each token's log-probability")
@click.option("--top-logprobs", type=int, default=0, show_default=True, help="with --logprobs: the N likeliest others")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lora/--no-lora", default=True, show_default=True, help="draft with the linear_spec LoRA adapter")
@click.option("--acceptance", default="speculative", show_default=True,
              help="linear_spec at temperature > 0: speculative (accepts more) | official (the reference's); both exact")
@click.option("--draft", default="repeat", show_default=True,
              help="linear_spec with --threshold > 0: repeat (passes until no MASK is left) | once")
@click.option("--allow-lossy", is_flag=True, help="mode auto may also choose dlm")
@click.option("--max-thinking-tokens", type=int, default=None, help="thinking budget (needs an end-think token)")
@click.option("--end-think-token", default=None,
              help="token that closes thinking [default: the tokenizer's, [/THINK] or </think>]")
@click.option("--think/--no-think", default=False, show_default=True, help="enable_thinking in the chat template")
@click.option("--raw", is_flag=True, help="do not apply the chat template")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="an image file for a vision-language model (repeatable): the user turn holds the images, then PROMPT")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: text, token_ids, prompt_token_ids, stats")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="compiled decode passes (CUDA graphs on a GPU, torch.compile on CPU) or the eager reference "
                   "[default: compiled on CUDA, eager on CPU]")
@kv_options
def generate(prompt, model_dir, mode, block_length, threshold, max_new_tokens, temperature, top_k, top_p, min_p, stop,
             bad_words, prompt_logprobs, min_tokens, logprobs, top_logprobs, seed, lora, acceptance, draft, allow_lossy,
             max_thinking_tokens, end_think_token, think, raw, images, as_json, device, dtype, compile_, kv_cache_tokens,
             kv_cache_gb, page_size, prefix_cache) -> None:
    """Generate a completion for PROMPT in one decoding mode."""
    from pathlib import Path

    from .checkpoint import check_model_dir
    from .runtime import default_model_path, load

    path = default_model_path(images=bool(images)) if model_dir is None else Path(model_dir)
    check_model_dir(path, lora=lora)
    console = _console()
    model = load(path, device=device, dtype=dtype, max_batch=1, lora=lora, compile=compile_,
                 progress=lambda line: console.print(f"[dim]{line}[/dim]"),
                 **kv_kwargs(kv_cache_tokens, kv_cache_gb, page_size, prefix_cache))
    end_think_id = None
    if max_thinking_tokens is not None:
        if end_think_token is None and model.prompts.thinking is None:
            raise NLDError("the tokenizer has no thinking tokens ([THINK]/[/THINK] or <think>/</think>): pass "
                           "--end-think-token")
        end_think_id = (model.prompts.thinking[1] if end_think_token is None
                        else model.tokenizer.token_id(end_think_token))
        if end_think_id is None:
            raise NLDError(f"the tokenizer has no token {end_think_token!r}: pass --end-think-token")
    if images and raw:
        raise NLDError("--image needs the chat template (it places the images in the user turn): drop --raw")
    if images:
        prompt = [{"role": "user", "content": [*({"type": "image", "image": Path(f)} for f in images),
                                                {"type": "text", "text": prompt}]}]
    result = model.generate(
        prompt,
        chat=not raw,
        template_kwargs={"enable_thinking": think},
        mode=mode,
        block_length=block_length,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        stop=list(stop),
        bad_words=list(bad_words),
        prompt_logprobs=prompt_logprobs,
        min_tokens=min_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        seed=seed,
        lora=lora,
        acceptance=acceptance,
        draft=draft,
        allow_lossy=allow_lossy,
        max_thinking_tokens=max_thinking_tokens,
        end_think_token_id=end_think_id,
    )
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(result.text)
    if result.prompt_logprobs is not None:
        console.print("[dim]prompt[/dim]")
        _print_logprobs(console, model.tokenizer, [lp for lp in result.prompt_logprobs if lp is not None])
    if result.logprobs is not None:
        _print_logprobs(console, model.tokenizer, result.logprobs)
    s = result.stats
    extra = ""
    if s.accepted_per_step:
        extra = f"  mean accepted {sum(s.accepted_per_step) / len(s.accepted_per_step):.2f}"
    stop_reason = f" ({result.stop_reason!r})" if result.stop_reason is not None else ""
    if s.auto:
        extra += "  auto steps " + ", ".join(f"{k} {v}" for k, v in s.auto["steps"].items())
    console.print(
        f"[dim]{mode}: {s.tokens} tokens, {nfe_phrase(s.as_dict())}, "
        f"prefill {s.prefill_s * 1e3:.1f} ms, decode {s.decode_s * 1e3:.1f} ms{extra}, "
        f"finish {result.finish_reason}{stop_reason}[/dim]"
    )


def _print_logprobs(console, tokenizer, logprobs) -> None:
    from rich.table import Table

    table = Table("token", "logprob", "most likely", box=None, header_style="dim")
    for lp in logprobs:
        others = ", ".join(f"{tokenizer.token_text(t)!r} {v:.2f}" for t, v in lp.top)
        table.add_row(repr(tokenizer.token_text(lp.token_id)), f"{lp.logprob:.3f}", others)
    console.print(table)


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def info(model_dir, as_json) -> None:
    """Print a checkpoint's parsed configuration and parameter count."""
    from .checkpoint import check_model_dir, load_lora
    from .runtime import default_model_path
    from .tokenizer import NLDTokenizer

    path = default_model_path() if model_dir is None else model_dir
    config = check_model_dir(path)
    tokenizer = NLDTokenizer(path)
    lora = load_lora(path, config)
    vlm = None
    if config.is_vlm:
        from .vision.config import VLMConfig

        vlm = VLMConfig.from_file(path)
    data = {
        "path": str(path),
        **(config.to_dict() if vlm is None else vlm.to_dict()),
        "parameters": config.num_parameters() + (0 if vlm is None else vlm.vision_parameters()),
        "tokenizer_vocab": tokenizer.vocab_size,
        "chat_template": bool(tokenizer.chat_template),
        "linear_spec_lora": None if lora is None else {"r": lora.rank, "alpha": lora.alpha, "layers": len(lora.layers)},
    }
    if vlm is not None:
        v = vlm.vision
        data["vision_tower"] = {
            "layers": v.num_hidden_layers, "hidden": v.hidden_size, "heads": v.num_attention_heads,
            "head_dim": v.head_dim, "intermediate": v.intermediate_size, "patch": v.patch_size, "act": v.hidden_act,
            "merge": vlm.spatial_merge_size, "pixels_per_image_token": vlm.cell,
            "projector": f"{v.hidden_size} x {vlm.spatial_merge_size ** 2} -> {v.hidden_size} -> {vlm.text.hidden_size} "
                         f"({vlm.projector_hidden_act}) -> {vlm.text.hidden_size}",
            "parameters": vlm.vision_parameters(),
        }
    if as_json:
        click.echo(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"NLD checkpoint {path}", show_header=False)
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    Console().print(table)


@cli.command()
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@click.option("--output", type=click.Path(file_okay=False), required=True, help="engine directory to write")
@click.option("--max-batch", type=int, default=8, show_default=True, help="sequences per engine call")
@click.option("--max-seq-len", type=int, default=2048, show_default=True, help="KV-cache positions per sequence")
@click.option("--max-block", type=int, default=32, show_default=True, help="longest decode chunk (block length)")
@click.option("--page-size", type=int, default=DEFAULT_PAGE_SIZE, show_default=True, help="positions per KV-cache page")
@click.option("--kv-cache-tokens", type=int, default=None,
              help="the TensorRT plan's KV page pool in positions [default: max-batch x max-seq-len]")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "float32"]), default="bf16", show_default=True,
              help="graph precision (float32 for the ONNX Runtime executor on CPU)")
@click.option("--onnx-only", is_flag=True, help="stop after the ONNX graph and its verification")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="check the graph with ONNX Runtime against the PyTorch executor (greedy, every mode)")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
def build(checkpoint, output, max_batch, max_seq_len, max_block, page_size, kv_cache_tokens, dtype, onnx_only, verify,
          overwrite) -> None:
    """Export the (quantized) checkpoint to an ONNX graph, verify it, and build a TensorRT engine."""
    from pathlib import Path

    from .engine.build import BuildOptions, build as run_build
    from .runtime import default_model_path

    console = _console()
    options = BuildOptions(
        checkpoint=Path(checkpoint) if checkpoint else default_model_path(), output=Path(output),
        max_batch=max_batch, max_seq_len=max_seq_len, max_block=max_block, page_size=page_size,
        kv_cache_tokens=kv_cache_tokens, dtype=dtype, onnx_only=onnx_only, verify=verify, overwrite=overwrite,
    )
    report = run_build(options, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    click.echo(f"wrote {output}: {report.graph} ({report.dtype}, {report.nodes} nodes, custom {', '.join(report.custom_nodes)})"
               + (f", {report.plan}" if report.plan else ""))


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="sequences decoding at once at most, as the deployment has")
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--max-block-length", type=int, default=128, show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="where to save it (default: the user cache; a served repository keeps its own)")
@click.option("--force", is_flag=True, help="measure again even if a calibration for this executor is saved")
@kv_options
def calibrate(model_dir, device, dtype, max_batch, max_seq_len, max_block_length, output_dir, force, kv_cache_tokens,
              kv_cache_gb, page_size, prefix_cache) -> None:
    """Measure what a forward pass costs on this executor and device (mode auto's cost model); print it."""
    from .executors.cost import calibration_file
    from .runtime import load

    model = load(model_dir, device=device, dtype=dtype, max_batch=max_batch, max_seq_len=max_seq_len,
                 max_block_length=max_block_length, calibration_dir=output_dir,
                 **kv_kwargs(kv_cache_tokens, kv_cache_gb, page_size, prefix_cache))
    if force:
        from .executors.cost import default_directory

        calibration_file(model.executor, Path(output_dir) if output_dir else default_directory()).unlink(missing_ok=True)
    console = _console()
    cost = model.calibrate(progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    click.echo(cost.table())
    click.echo(f"{'measured and saved' if model.calibration_measured else 'already saved'}: {model.calibration_file}")


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}


@cli.command("sample-image")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(PICTURE_KINDS), default=SAMPLE_KIND,
              show_default=True, help="what the printed question asks about the picture")
@click.option("--seed", type=int, default=None, help="another picture of the kind [default: the README's]")
def sample_image(output, kind, seed) -> None:
    """Write a synthetic picture like those the embedded tiny VLM learned from (OUTPUT: .png, .jpg, .webp, .gif
    or .bmp) and print a question about it; the expected answer goes to stderr."""
    import io

    from .fileutil import write_file
    from .training import pictures

    out = Path(output)
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise NLDError(f"OUTPUT {output!r}: name the image format by its suffix ({', '.join(IMAGE_FORMATS)})")
    if not out.resolve().parent.is_dir():
        raise NLDError(f"OUTPUT {output!r}: the directory {str(out.parent)!r} does not exist")
    item = pictures.sample(kind, seed)
    encoded = io.BytesIO()
    item.scene.draw().save(encoded, format=fmt)
    write_file(out, encoded.getbuffer(), "OUTPUT")
    click.echo(item.question.question)
    _console().print(f"[dim]wrote {output} ({item.scene.size[0]} x {item.scene.size[1]}); expected answer: "
                     f"{item.question.value}[/dim]")


def _add_commands() -> None:
    """Commands that live beside what they drive: eval, quantize, and the serving commands."""
    from .evaluate import eval_command
    from .quant.cli import quantize_command
    from .serving.cli import (chat_command, client_command, demo_command, openai_command, package_command,
                              serve_command)
    from .serving.dynamo.cli import cluster_command, worker_command

    cli.add_command(eval_command, "eval")
    for command in (quantize_command, package_command, serve_command, openai_command, client_command, chat_command,
                    demo_command, worker_command, cluster_command):
        cli.add_command(command)


_add_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `nld-trt` console script."""
    run_command(cli, argv)


if __name__ == "__main__":
    main()
