"""`nld-trt package | serve | openai | client | chat | demo`: click commands, registered on the main `nld-trt` group.

Also runnable on their own: `python -m nld_trt.serving.cli COMMAND ...`.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..cli_support import KV_OPTIONS, MODEL_HELP, kv_kwargs, nfe_phrase, run_command
from ..errors import NLDError
from .openai.media import MAX_BODY_BYTES

# One conversation of the kind the embedded model was trained on (GSM-style, from nld_trt/training/data.py;
# neither question is in its evaluation set): the second question is a follow-up that only makes sense after
# the first answer. The demo checks that each answer carries its number.
DEMO_CONVERSATION = (
    ("Sam runs 12 miles every day for 5 days. Then he runs 7 more miles. How many miles does Sam run in total?", "67"),
    ("And if he kept going for 3 more days?", "103"),
)


def _err(message: str) -> None:
    click.echo(message, err=True)


def stats_line(stats: dict[str, Any]) -> str:
    """One line of per-request stats, as `nld-trt generate` prints them."""

    extra = f", mean accepted {stats['mean_accepted']:.2f}" if "mean_accepted" in stats else ""
    return (
        f"{stats.get('mode', '?')}: {stats.get('tokens', 0)} tokens, {nfe_phrase(stats)}"
        f"{extra}, latency {stats.get('latency_s', 0) * 1e3:.0f} ms, "
        f"finish {stats.get('finish_reason', '?')}, KV slots in use {stats.get('slots_in_use', '?')}/"
        f"{stats.get('slots_total', '?')}"
    )


def generation_options(f):
    """The per-request options shared by `client` and `chat`."""
    for option in reversed([
        click.option("--mode", default="ar", show_default=True, help="ar | dlm | linear_spec | auto"),
        click.option("--max-tokens", type=int, default=128, show_default=True),
        click.option("--block-length", type=int, default=None, help="default: the checkpoint's block_size"),
        click.option("--threshold", type=float, default=None, help="default: 0.9 dlm, 0.0 linear_spec"),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy"),
        click.option("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens"),
        click.option("--top-p", type=float, default=None, help="sampling: nucleus mass"),
        click.option("--min-p", type=float, default=None, help="sampling: drop tokens under min-p x the top one"),
        click.option("--stop", multiple=True, help="stop string (repeatable)"),
        click.option("--bad-word", "bad_words", multiple=True, help="banned word (repeatable), encoded as it is"),
        click.option("--seed", type=int, default=0, show_default=True),
    ]):
        f = option(f)
    return f


def sampling_fields(top_k, top_p, min_p, stop, bad_words) -> dict[str, Any]:
    """The model inputs of the sampling options (None: not sent)."""
    return dict(top_k=top_k, top_p=top_p, min_p=min_p, stop_words=list(stop) or None, bad_words=list(bad_words) or None)


# package --------------------------------------------------------------------------------------------
# What a deployment holds and accepts (ServingOptions): options of `package`, and of `serve MODEL_DIR`.
PACKAGE_OPTIONS = (
    click.option("--max-batch", type=int, default=8, show_default=True,
                 help="sequences a model instance decodes at once at most"),
    click.option("--max-seq-len", type=int, default=2048, show_default=True, help="the longest sequence (KV positions)"),
    click.option("--max-block-length", type=int, default=128, show_default=True),
    click.option("--max-tokens-cap", type=int, default=1024, show_default=True, help="largest max_tokens accepted"),
    click.option("--default-max-tokens", type=int, default=128, show_default=True),
    click.option("--instances", type=int, default=1, show_default=True, help="model instances (processes) per model"),
    click.option("--device", default="cpu", show_default=True, help="cpu or cuda"),
    click.option("--dtype", default="", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)"),
    click.option("--threads", type=int, default=1, show_default=True,
                 help="PyTorch CPU threads per model instance (0: PyTorch's default, every core)"),
    click.option("--default-mode", default="ar", show_default=True,
                 help="mode of requests that do not name one: ar | dlm | linear_spec | auto"),
    click.option("--max-prompt-bytes", type=int, default=0, help="prompt size cap, checked before tokenizing "
                 "(default: 32 bytes per KV position, at least 64 KiB)"),
    click.option("--compile", "compile_", type=click.Choice(["auto", "true", "false"]), default="auto",
                 show_default=True, help="PyTorch executor: compiled (CPU) / graph-captured (CUDA) passes; auto: "
                 "graphs on CUDA, eager on CPU"),
    click.option("--max-image-bytes", type=int, default=10 * 1024 * 1024, show_default=True,
                 help="a vision-language model: largest image accepted, encoded (a data URL's payload)"),
    click.option("--max-image-pixels", type=int, default=32 * 1024 * 1024, show_default=True,
                 help="largest image accepted, decoded (width x height), checked before its pixels are decoded"),
    click.option("--max-images-per-request", type=int, default=8, show_default=True, help="images in one request"),
    click.option("--image-workers", type=int, default=1, show_default=True,
                 help="threads decoding and encoding images beside the decoding thread (0: in the prefill, on it)"),
    *KV_OPTIONS,
    click.option("--kv-events/--no-kv-events", default=True, show_default=True,
                 help="publish the prefix cache's KV events to subscribers (Dynamo's KV router); they carry every "
                      "cached page's token ids to any client of the gRPC port, so turn them off where untrusted "
                      "clients reach it"),
)
PACKAGE_PARAMS = ("max_batch", "max_seq_len", "max_block_length", "max_tokens_cap", "default_max_tokens", "instances",
                  "device", "dtype", "threads", "default_mode", "max_prompt_bytes", "compile_", "max_image_bytes",
                  "max_image_pixels", "max_images_per_request", "image_workers", "kv_cache_tokens", "kv_cache_gb",
                  "page_size", "prefix_cache", "kv_events")


def package_options(f):
    for option in reversed(PACKAGE_OPTIONS):
        f = option(f)
    return f


def serving_options(values: dict[str, Any]):
    """The ServingOptions of the package options' values."""
    from .package import ServingOptions

    v = dict(values)
    kv = kv_kwargs(v.pop("kv_cache_tokens"), v.pop("kv_cache_gb"), v.pop("page_size"), v.pop("prefix_cache"))
    return ServingOptions(torch_threads=v.pop("threads"), compile=v.pop("compile_"),
                          kv_cache_tokens=kv["kv_cache_tokens"] or 0, kv_cache_gb=kv["kv_cache_gb"] or 0.0,
                          page_size=kv["page_size"], prefix_cache=kv["prefix_cache"], **v)


@click.command("package")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="repository to write")
@package_options
@click.option("--sync-model/--no-sync-model", default=True, show_default=True,
              help="also write nld_sync, the non-decoupled entry point (unary infer, HTTP generate)")
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False), default=None,
              help="serve an nld-trt build output instead of a checkpoint (TensorRT plan on cuda, ONNX graph on cpu)")
@click.option("--overwrite", is_flag=True, help="replace an existing repository")
def package_command(model_dir, output, sync_model, engine_dir, overwrite, **options) -> None:
    """Write a Triton model repository serving a checkpoint or an engine, every decoding mode chosen per request."""
    from .package import package_repository

    if engine_dir and model_dir:
        raise click.UsageError("give --model (a checkpoint) or --engine (a build output), not both")
    repo = package_repository(engine_dir or model_dir, output, serving_options(options), sync_model=sync_model,
                              overwrite=overwrite, engine=engine_dir is not None)
    manifest = json.loads((repo / "nld" / "1" / "manifest.json").read_text())
    size = sum(f["size"] for f in manifest["files"].values())
    models = "nld, nld_sync, nld_tokenizer" if sync_model else "nld, nld_tokenizer"
    click.echo(f"wrote {repo}: models {models}; {len(manifest['files'])} artifacts ({size / 1e6:.1f} MB) with SHA-256 manifest")
    click.echo(f"serve it with: nld-trt serve {repo}")


# serve ----------------------------------------------------------------------------------------------
def openai_options(f):
    """The OpenAI front end's options, shared by `serve` and `openai`."""
    for option in reversed([
        click.option("--served-model-name", default=None,
                     help="the model id OpenAI clients send (default: the Triton model's name, nld)"),
        click.option("--max-body-bytes", type=int, default=MAX_BODY_BYTES, show_default=True,
                     help="largest request body the OpenAI front end accepts (HTTP 413 beyond); images come as base64 "
                     "data URLs, 4/3 of their size"),
        click.option("--allowed-media-domains", multiple=True, metavar="HOST",
                     help="hosts whose http(s) image URLs the front end fetches (repeatable or comma-separated; "
                     "default: none, so only data URLs are taken)"),
        click.option("--media-fetch-timeout", type=float, default=10.0, show_default=True,
                     help="seconds an allowed image URL may take to fetch"),
    ]):
        f = option(f)
    return f


@click.command("serve")
@click.argument("path", type=click.Path(file_okay=False), required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--openai-port", type=int, default=9000, show_default=True,
              help="port of the OpenAI-compatible API and the chat page (0: no OpenAI front end)")
@openai_options
@click.option("--tritonserver", "binary", type=click.Path(dir_okay=False), default=None,
              help="tritonserver binary (default: the one nvidia-pytriton ships, else tritonserver on PATH)")
@click.option("--model-control-mode", type=click.Choice(["none", "explicit"]), default="none", show_default=True,
              help="explicit: load no model at start (load through the repository API)")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True, help="seconds to wait for ready")
@package_options
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="where `serve MODEL_DIR` keeps its packaged repositories (default: the user cache)")
@click.pass_context
def serve_command(ctx, path, host, http_port, grpc_port, metrics_port, openai_port, served_model_name, max_body_bytes,
                  allowed_media_domains, media_fetch_timeout, binary, model_control_mode, ready_timeout, cache_dir,
                  **options) -> None:
    """Serve PATH with the Triton Inference Server, and the OpenAI-compatible API in front of it, until Ctrl-C or
    SIGTERM. PATH is a model repository (`nld-trt package` output), or a model directory (a checkpoint, a
    quantized checkpoint or an `nld-trt build` output; the embedded model when omitted), which is packaged with
    the package options into a cached repository first (reused while the model and the options are unchanged)."""
    from .server import ServerError, TritonServer, client_host, free_port

    if openai_port < 0:
        raise click.BadParameter("must be a port number, or 0 for no OpenAI front end", param_hint="--openai-port")
    grpc_port = grpc_port or free_port()
    front = None
    if openai_port:  # its port first: a port in use fails before packaging or tritonserver starts
        from .openai.frontend import FrontEnd

        front = FrontEnd(f"{client_host(host)}:{grpc_port}", host=host, port=openai_port,
                         served_model=served_model_name, max_body_bytes=max_body_bytes,
                         media=media_options(allowed_media_domains, media_fetch_timeout)).bind()
    try:
        repo = _repository(ctx, path, cache_dir, options)
    except BaseException:
        if front is not None:
            front.stop()
        raise
    extra = ["--model-control-mode=explicit"] if model_control_mode == "explicit" else []
    server = TritonServer(Path(repo), host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, binary=binary, extra_args=extra, log=_err)
    # both stop the server; SIGINT too, as a shell starts background jobs with SIGINT ignored
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(timeout=ready_timeout)
        if front is not None:
            front.start()
        _err(f"nld-trt: serving {repo}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
             f"metrics {server.metrics_url}; Ctrl-C or SIGTERM stops")
        if front is not None:
            _err(f"nld-trt: OpenAI API {front.url}/v1, chat page {front.url}/")
        while server.process.poll() is None:
            time.sleep(0.5)
        raise ServerError(f"tritonserver exited on its own with code {server.process.returncode}")
    except KeyboardInterrupt:
        _err("nld-trt: stopping tritonserver")
    finally:
        if front is not None:
            front.stop()
        code = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        raise ServerError(f"tritonserver stopped with code {code}")
    _err("nld-trt: tritonserver stopped")


@click.command("openai")
@click.option("--triton", "triton_url", default="127.0.0.1:8001", show_default=True,
              help="gRPC address of a running tritonserver serving an nld-trt repository")
@click.option("--triton-model", default="nld", show_default=True, help="its decoupled (streaming) model")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", type=int, default=9000, show_default=True)
@openai_options
def openai_command(triton_url, triton_model, host, port, served_model_name, max_body_bytes, allowed_media_domains,
                   media_fetch_timeout) -> None:
    """Serve only the OpenAI-compatible API and the chat page, in front of a tritonserver started elsewhere."""
    from .openai.frontend import FrontEnd

    front = FrontEnd(triton_url, host=host, port=port, triton_model=triton_model, served_model=served_model_name,
                     max_body_bytes=max_body_bytes, media=media_options(allowed_media_domains, media_fetch_timeout))
    front.serve_forever(lambda url: _err(f"nld-trt: OpenAI API {url}/v1, chat page {url}/, for tritonserver "
                                         f"{triton_url} (model {triton_model}); Ctrl-C stops"))


def media_options(domains: tuple[str, ...], timeout: float):
    """The front end's image fetching: the allowed hosts (each option may list several, comma-separated)."""
    from .openai.media import MediaOptions

    hosts = tuple(h.strip().lower() for d in domains for h in d.split(",") if h.strip())
    if timeout <= 0:
        raise click.BadParameter("must be a positive number of seconds", param_hint="--media-fetch-timeout")
    return MediaOptions(allowed_domains=hosts, timeout_s=timeout)


def _repository(ctx: click.Context, path: str | None, cache_dir: str | None, options: dict[str, Any]) -> Path:
    """The repository to serve: PATH itself, or PATH (a model directory) packaged into the cache."""
    from ..engine.loader import is_engine_dir
    from ..runtime import default_model_path
    from .cache import cached_repository, is_repository

    if path is not None and is_repository(Path(path)):
        given = [name for name in (*PACKAGE_PARAMS, "cache_dir")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            flags = ", ".join("--" + n.rstrip("_").replace("_", "-") for n in given)
            raise click.UsageError(f"{flags}: {path} is a packaged repository, whose options are fixed; they apply "
                                   "when serving a model directory (or re-run nld-trt package)")
        return Path(path)
    model = default_model_path() if path is None else Path(path)
    repo, reused = cached_repository(model, serving_options(options), engine=is_engine_dir(model),
                                     cache=Path(cache_dir) if cache_dir else None, progress=lambda m: _err(f"nld-trt: {m}"))
    _err(f"nld-trt: {'reusing' if reused else 'packaged'} {repo} for {model}")
    return repo


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# client ---------------------------------------------------------------------------------------------
@click.command("client")
@click.argument("prompt")
@click.option("--url", default=None, help="server address (default 127.0.0.1:8001 for grpc, :8000 for http)")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--model", "model_name", default=None, help="default: nld when streaming, nld_sync otherwise")
@generation_options
@click.option("--stream/--no-stream", default=True, show_default=True, help="print tokens as they arrive")
@click.option("--raw", is_flag=True, help="do not apply the chat template")
@click.option("--logprobs", is_flag=True, help="return each token's log-probability (in --json output)")
@click.option("--top-logprobs", type=int, default=None, help="with --logprobs: the N likeliest others")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: text, token_ids, finish_reason, stats")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="an image file for a vision-language model (repeatable), sent inline as a data URL "
              "(image_url_input); PROMPT may hold <|image_start|> where each goes, else they come first")
def client_command(prompt, url, protocol, model_name, mode, max_tokens, block_length, threshold, temperature,
                   top_k, top_p, min_p, stop, bad_words, seed, stream, raw, logprobs, top_logprobs, as_json,
                   images) -> None:
    """Send PROMPT to a running server; print the tokens as they arrive, then the stats."""
    from . import client as c

    url = url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000")
    model_name = model_name or (c.STREAM_MODEL if stream else c.SYNC_MODEL)
    fields = dict(text_input=prompt, image_url_input=[c.data_url(Path(i)) for i in images] or None, mode=mode,
                  max_tokens=max_tokens, block_length=block_length,
                  threshold=threshold, temperature=temperature, seed=seed, chat=not raw,
                  return_log_probs=logprobs or None, top_logprobs=top_logprobs,
                  **sampling_fields(top_k, top_p, min_p, stop, bad_words))
    if stream:
        chunks = (c.GrpcClient(url).stream(model_name, **fields) if protocol == "grpc"
                  else c.http_generate_stream(url, model_name, **fields))
        collected = []
        for chunk in chunks:
            collected.append(chunk)
            if not as_json:
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
        result = c.Result.join(collected)
    elif protocol == "grpc":
        result = c.GrpcClient(url).infer(model_name, **fields)
    else:
        result = c.http_generate(url, model_name, **fields)
    if as_json:
        click.echo(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                               "stats": result.stats, **({"logprobs": result.logprobs} if logprobs else {})}))
        return
    if not stream:
        click.echo(result.text, nl=False)
    click.echo()
    _err(stats_line(result.stats))


# chat -----------------------------------------------------------------------------------------------
CHAT_HELP = "/mode ar|dlm|linear_spec switches the decoding mode, /reset forgets the conversation, /quit ends"


@click.command("chat")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="gRPC address of the server")
@click.option("--model", "model_name", default="nld", show_default=True)
@generation_options
@click.option("--system", default=None, help="a system prompt")
def chat_command(url, model_name, mode, max_tokens, block_length, threshold, temperature, top_k, top_p, min_p, stop,
                 bad_words, seed, system) -> None:
    """Multi-turn chat over gRPC streaming, reading user turns from stdin (one per line).

    /mode ar|dlm|linear_spec switches the decoding mode mid-conversation; /reset; /quit."""
    from ..decoding import MODES
    from .client import ClientError, GrpcClient, Result

    client = GrpcClient(url)
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    _err(f"nld-trt chat with {url} ({mode}). {CHAT_HELP}")
    while True:
        if interactive:
            click.echo("you> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                messages = list(base)
                _err("(conversation reset)")
            elif command == "/mode" and arg.strip() in MODES:
                mode = arg.strip()
                _err(f"(mode {mode})")
            elif command == "/mode":
                _err(f"(unknown mode {arg.strip()!r}: choose one of {', '.join(MODES)})")
            else:
                _err(f"(unknown command {command}: {CHAT_HELP})")
            continue
        messages.append({"role": "user", "content": line})
        click.echo(f"[{mode}] ", nl=False)
        chunks = []
        try:
            for chunk in client.stream(model_name, messages=json.dumps(messages), mode=mode, max_tokens=max_tokens,
                                       block_length=block_length, threshold=threshold, temperature=temperature,
                                       seed=seed, **sampling_fields(top_k, top_p, min_p, stop, bad_words)):
                chunks.append(chunk)
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
            result = Result.join(chunks)
        except ClientError as e:
            click.echo()
            _err(f"(error: {e})")
            messages.pop()
            continue
        click.echo()
        _err(stats_line(result.stats))
        messages.append({"role": "assistant", "content": result.text})


# demo -----------------------------------------------------------------------------------------------
@click.command("demo")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@click.option("--prompt", default=None,
              help="ask this instead of the built-in conversation (its answers are then not checked)")
@click.option("--followup", default=None, help="with --prompt: a second question in the same conversation")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
@click.option("--picture/--no-picture", default=None,
              help="then serve the embedded tiny VLM and ask it about a generated picture in each mode "
                   "[default: with the built-in conversation and the embedded model]")
def demo_command(model_dir, prompt, followup, max_tokens, block_length, picture) -> None:
    """Package a model, serve it with Triton, hold a two-question conversation in each mode, print answers and
    stats, stop; then the same for the embedded tiny VLM with one question about a generated picture. With the
    built-in conversation, fail unless every answer is right."""
    from ..evaluate import extract_answer
    from .client import GrpcClient, http_generate

    if followup is not None and prompt is None:
        raise NLDError("--followup needs --prompt (the built-in conversation has its own follow-up)")
    if picture is None:  # a demo of the user's own model or question stays about that
        picture = model_dir is None and prompt is None
    turns = list(DEMO_CONVERSATION) if prompt is None else [(q, None) for q in (prompt, followup) if q is not None]
    wrong: list[str] = []

    def check(label: str, text: str, gold: str | None) -> None:
        if gold is None:
            return
        got = extract_answer(text)
        click.echo(f"  answer {got}: " + ("right" if got == gold else f"WRONG, expected {gold}"))
        if got != gold:
            wrong.append(f"{label} answered {got}, expected {gold}")

    with tempfile.TemporaryDirectory(prefix="nld-trt-demo-") as tmp:
        with _demo_server(model_dir, Path(tmp) / "repo", model_dir or "the embedded model") as server:
            grpc = GrpcClient(server.grpc_url)
            for mode in ("ar", "dlm", "linear_spec"):
                messages: list[dict[str, Any]] = []
                for n, (question, gold) in enumerate(turns, 1):
                    messages.append({"role": "user", "content": question})
                    result = _streamed_turn(grpc, f"{mode}, gRPC stream, turn {n}", question, messages, mode, max_tokens,
                                            block_length)
                    check(f"{mode} turn {n}", result.text, gold)
                    messages.append({"role": "assistant", "content": result.text})
            messages.pop()  # the whole conversation once more, unary, its last question unanswered
            unary = http_generate(server.http_url, messages=json.dumps(messages), mode="linear_spec",
                                  max_tokens=max_tokens, block_length=block_length)
            click.echo(f"\n[linear_spec, HTTP generate on nld_sync, turn {len(turns)}] {unary.text}\n  {stats_line(unary.stats)}")
            check(f"HTTP linear_spec turn {len(turns)}", unary.text, turns[-1][1])
        if picture:
            _picture_demo(Path(tmp), max_tokens, block_length, check)
    if wrong:
        raise NLDError("the demo got wrong answers: " + "; ".join(wrong))
    if prompt is None:
        click.echo("every answer of the conversation carries the right number, in every mode"
                   + (", and the tiny VLM read the picture right in every mode" if picture else ""))


@contextmanager
def _demo_server(model_dir, repo_dir: Path, label: str):
    """Package `model_dir` (None: the embedded text model) into `repo_dir`, serve it with tritonserver for the
    block, then stop it; a non-zero exit fails the demo."""
    from .package import ServingOptions, package_repository
    from .server import TritonServer

    repo = package_repository(model_dir, repo_dir, ServingOptions(max_batch=4, max_seq_len=1024))
    click.echo(f"packaged {label} into a Triton model repository; starting tritonserver")
    start = time.perf_counter()
    with TritonServer(repo) as server:
        click.echo(f"tritonserver ready in {time.perf_counter() - start:.1f} s (HTTP {server.http_url}, gRPC "
                   f"{server.grpc_url})")
        yield server
        code = server.stop()
    click.echo(f"\ntritonserver stopped (exit code {code})")
    if code != 0:
        raise NLDError(f"tritonserver exited with code {code}")


def _streamed_turn(grpc, label: str, shown: str, messages: list[dict[str, Any]], mode: str, max_tokens: int,
                   block_length: int | None):
    """One turn over gRPC streaming, printed as it arrives, then its stats; returns the joined result."""
    from .client import Result

    click.echo(f"\n[{label}] user: {shown}\n  assistant: ", nl=False)
    chunks = []
    for chunk in grpc.stream(messages=json.dumps(messages), mode=mode, max_tokens=max_tokens, block_length=block_length):
        chunks.append(chunk)
        click.echo(chunk.text, nl=False)
    click.echo()
    result = Result.join(chunks)
    click.echo(f"  {stats_line(result.stats)}")
    return result


def _picture_demo(tmp: Path, max_tokens: int, block_length: int | None, check) -> None:
    """The embedded tiny VLM, packaged and served: one question about a generated picture in each mode, the
    picture sent inline as a PNG data URL in an `image_url` content part (as the OpenAI front end forwards it)."""
    from ..runtime import default_model_path
    from ..training import pictures
    from .client import GrpcClient, data_url

    item = pictures.sample()  # `nld-trt sample-image`'s default picture, not an evaluation one
    image = tmp / "picture.png"
    item.scene.draw().save(image)
    question = item.question.question
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": question}]}]
    click.echo()
    with _demo_server(default_model_path(images=True), tmp / "vlm-repo", "the embedded tiny VLM") as server:
        click.echo(f"the picture: `nld-trt sample-image pic.png` writes it ({item.scene.size[0]} x "
                   f"{item.scene.size[1]} pixels)")
        grpc = GrpcClient(server.grpc_url)
        for mode in ("ar", "dlm", "linear_spec"):
            result = _streamed_turn(grpc, f"{mode}, gRPC stream, tiny VLM", f"<picture> {question}", messages, mode,
                                    max_tokens, block_length)
            check(f"{mode} picture", result.text, item.question.value)


COMMANDS = (package_command, serve_command, openai_command, client_command, chat_command, demo_command)


@click.group()
def serving_cli() -> None:
    """nld-trt serving commands (also available as `nld-trt COMMAND`)."""


for _command in COMMANDS:
    serving_cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:

    run_command(serving_cli, argv)


if __name__ == "__main__":
    main()
