"""What every `nld-trt` command shares: the one-line error handling, the console, how NFE is printed and the
KV-cache options. The command modules (nld_trt/cli.py, serving/cli.py, quant/cli.py, evaluate.py) import it;
it imports none of them."""

from __future__ import annotations

import sys
from typing import Any

import click

from .config import DEFAULT_PAGE_SIZE
from .errors import NLDError, out_of_memory, out_of_memory_error

MODEL_HELP = "checkpoint directory (default: the embedded tiny NLD model)"
OUT_OF_MEMORY_FIX = ("Ask for less at once: a smaller --max-batch, --max-seq-len or --kv-cache-tokens / "
                     "--kv-cache-gb where the command has them, or a quantized checkpoint.")


def console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def nfe_phrase(stats: dict) -> str:
    """NFE and TPF as printed everywhere, with the reference's count beside ours where they differ (dlm:
    the reference leaves the prefill out)."""
    phrase = f"{stats.get('nfe', 0)} forwards, TPF {stats.get('tpf', 0):.2f}"
    if stats.get("nfe_reference", stats.get("nfe")) != stats.get("nfe"):
        phrase += f" (as the reference counts: {stats['nfe_reference']} forwards, TPF {stats['tpf_reference']:.2f})"
    return phrase


# --kv-cache-tokens / --kv-cache-gb / --page-size / --prefix-cache: the paged KV cache (nld_trt/kv)
KV_OPTIONS = (
    click.option("--kv-cache-tokens", type=int, default=None,
                 help="KV-cache positions of the page pool [default: max-batch x max-seq-len; on a GPU at "
                      "most 80% of its free memory]"),
    click.option("--kv-cache-gb", type=float, default=None, help="the page pool's size in GiB instead"),
    click.option("--page-size", type=int, default=DEFAULT_PAGE_SIZE, show_default=True,
                 help="positions per KV-cache page"),
    click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
                 help="reuse the KV of cached prefixes (shared prompts, earlier turns)"),
)


def kv_options(f):
    for option in reversed(KV_OPTIONS):
        f = option(f)
    return f


def kv_kwargs(kv_cache_tokens: int | None, kv_cache_gb: float | None, page_size: int,
              prefix_cache: bool) -> dict[str, Any]:
    """The kv_options values as `nld_trt.load` keywords."""
    if kv_cache_tokens is not None and kv_cache_gb is not None:
        raise click.UsageError("give --kv-cache-tokens or --kv-cache-gb, not both")
    return dict(kv_cache_tokens=kv_cache_tokens, kv_cache_gb=kv_cache_gb, page_size=page_size,
                prefix_cache=prefix_cache)


def run_command(command: click.Command, argv: list[str] | None, prog_name: str = "nld-trt") -> None:
    """Run a click command with nld-trt's exit codes: one-line errors for bad input, never a traceback."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(2)
    except NLDError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Exception as e:
        if not out_of_memory(e):
            raise
        click.echo(f"Error: {out_of_memory_error(e, OUT_OF_MEMORY_FIX)}", err=True)
        sys.exit(1)
