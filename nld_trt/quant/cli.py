"""`nld-trt quantize`: the click command (registered on the `nld-trt` group by nld_trt/cli.py), also
runnable alone as `python -m nld_trt.quant`."""

from __future__ import annotations

import json

import click


def _print_report(report: dict, console) -> None:
    from rich.table import Table

    logits = report.get("logits")
    if logits:
        t = Table(title=f"{report['qformat']} vs original: logits on held-out prompts")
        for col in ("pattern", "cosine (mean)", "cosine (min)", "next-token agreement", "positions"):
            t.add_column(col)
        for pattern, s in logits.items():
            t.add_row(
                pattern,
                _f(s.get("cosine"), 6),
                _f(s.get("min_cosine"), 6),
                _f(s.get("agreement"), 4),
                str(s.get("positions")),
            )
        console.print(t)
    modes = report.get("modes")
    if modes:
        t = Table(title="decoding modes (greedy): original -> quantized")
        for col in ("mode", "accuracy %", "TPF", "mean accepted", "same output"):
            t.add_column(col)
        for mode, m in modes.items():
            o, q = m["original"], m["quantized"]
            t.add_row(
                mode,
                f"{_f(o['accuracy'], 1)} -> {_f(q['accuracy'], 1)}",
                f"{_f(o['tpf'], 3)} -> {_f(q['tpf'], 3)}",
                f"{_f(o['mean_accepted'], 2)} -> {_f(q['mean_accepted'], 2)}",
                f"{100 * m['same_output']:.0f}%",
            )
        console.print(t)
    for w in report.get("warnings", []):
        console.print(f"[bold yellow]WARNING[/bold yellow] {w}")


def _f(x, n: int) -> str:
    return "-" if x is None else f"{x:.{n}f}"


@click.command("quantize")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="checkpoint directory (default: the embedded tiny NLD model)",
)
@click.option("--qformat", required=True, help="fp8 (W8A8 E4M3) | int4_awq (W4A16, group 128); recipes in quantize/")
@click.option("--kv-cache-dtype", default=None, help="fp8: also calibrate FP8 KV-cache scales (default: none)")
@click.option(
    "--calib-data",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSONL calibration texts: `text`, or `question` + `answer` (default: built-in GSM-style problems)",
)
@click.option("--calib-size", type=int, default=None, help="calibration passes (default: the recipe's, 512)")
@click.option("--calib-seq-len", type=int, default=None, help="tokens per calibration pass at most (default 1024)")
@click.option(
    "--block-mix",
    type=float,
    default=None,
    help="share of block passes (diffusion drafts: [t, MASK...] and partly masked blocks), 0..1 (default 0.5)",
)
@click.option(
    "--image-mix",
    type=float,
    default=None,
    help="vision-language checkpoints: share of calibration passes over image prompts, 0..1 (default 0.25)",
)
@click.option(
    "--calib-images",
    type=click.Path(file_okay=False),
    default=None,
    help="vision-language checkpoints: a directory of calibration images (default: built-in synthetic pictures)",
)
@click.option(
    "--keep-lm-head/--quantize-lm-head",
    default=True,
    show_default=True,
    help="keep diffusion_head in the original precision",
)
@click.option("--output", required=True, type=click.Path(file_okay=False), help="output checkpoint directory")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (calibration and comparison)")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
@click.option(
    "--compare/--no-compare",
    default=True,
    show_default=True,
    help="measure quantized vs original on held-out prompts (logits, accuracy, TPF)",
)
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSONL held-out set with `question` + `answer` (default: the built-in evaluation set)",
)
@click.option("--eval-size", type=int, default=32, show_default=True, help="held-out prompts")
@click.option(
    "--eval-batch", type=int, default=8, show_default=True, help="sequences decoded together in the comparison"
)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option(
    "--block-length", type=int, default=None, help="block length for calibration and comparison (default: block_size)"
)
@click.option(
    "--strict", is_flag=True, help="a TPF or accuracy drop past the recipe's gate is an error (nothing written)"
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def quantize_command(
    model_dir,
    qformat,
    kv_cache_dtype,
    calib_data,
    calib_size,
    calib_seq_len,
    block_mix,
    image_mix,
    calib_images,
    keep_lm_head,
    output,
    overwrite,
    device,
    dtype,
    compare,
    eval_data,
    eval_size,
    eval_batch,
    max_new_tokens,
    block_length,
    strict,
    seed,
    as_json,
) -> None:
    """Quantize a checkpoint with NVIDIA ModelOpt (FP8 or INT4 AWQ), calibrated on causal and block passes,
    exported in the unified Hugging Face format, then compared with the original (accuracy and TPF)."""
    import os
    import warnings
    from pathlib import Path

    import torch
    from rich.console import Console

    from ..checkpoint import check_model_dir
    from ..runtime import default_model_path
    from .pipeline import QuantizeOptions, quantize_checkpoint

    model_dir = default_model_path() if model_dir is None else Path(model_dir)
    check_model_dir(model_dir)
    console = Console(stderr=True, highlight=False)
    if not os.environ.get("NLD_TRT_VERBOSE"):  # ModelOpt's version and tensor-copy notices are not ours to fix
        warnings.filterwarnings("ignore", category=UserWarning, module="modelopt")
    if device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    kv = None if kv_cache_dtype in (None, "none", "") else kv_cache_dtype
    opts = QuantizeOptions(
        qformat=qformat,
        output=output,
        model_dir=model_dir,
        kv_cache_dtype=kv,
        calib_data=calib_data,
        calib_size=calib_size,
        calib_seq_len=calib_seq_len,
        block_mix=block_mix,
        image_mix=image_mix,
        calib_images=calib_images,
        quantize_lm_head=not keep_lm_head,
        device=device,
        dtype=dtype,
        seed=seed,
        compare=compare,
        eval_data=eval_data,
        eval_size=eval_size,
        max_batch=eval_batch,
        max_new_tokens=max_new_tokens,
        block_length=block_length,
        strict=strict,
        overwrite=overwrite,
    )
    report = quantize_checkpoint(opts, log=lambda s: console.print(f"[dim]{s}[/dim]"))
    if as_json:
        click.echo(json.dumps(report))
        return
    _print_report(report, console)
    click.echo(str(output))


def main(argv: list[str] | None = None) -> None:
    """`python -m nld_trt.quant`: the command alone, with nld-trt's one-line errors and exit codes."""
    from ..cli_support import run_command

    run_command(quantize_command, argv, prog_name="nld-trt quantize")
