"""nld-trt's Dynamo worker: one nld-trt Triton deployment as a token-in worker behind Dynamo's frontend and router.

`nld-trt dynamo-worker --triton HOST:GRPC_PORT --model-dir DIR` registers the deployment's model with Dynamo (its
name, the tokenizer and chat template from DIR, the KV page size as the router's block size, the context length)
as a `ModelInput.Tokens` worker for chat and completions: Dynamo's frontend renders the chat template and tokenizes
(the KV router needs the ids), and this worker serves each request it routes here by streaming it to the
tritonserver over gRPC through the OpenAI front end's Triton bridge (serving/openai/triton.py), after the same
request mapping the OpenAI front end uses (request.py -> serving/openai/mapping.py).

- Each Triton response becomes one Dynamo chunk: its new token ids (a whole dlm block at once, say), the finish
  reason on a sequence's last one, with the usage and the prompt tokens the prefix cache supplied; `n` > 1
  streams every sequence with its index. Dynamo's frontend detokenizes, applies stop strings once more (the
  model has already stopped at them) and answers unary or SSE.
- A refused request (the mapping's refusal or the model's) raises `InvalidArgument` with nld-trt's message: a
  unary client gets HTTP 400 `{"message": ..., "type": "Bad Request", "code": 400}` (Dynamo's error shape, not
  OpenAI's `{"error": {...}}`), a streaming one an SSE `data: {"error": {"message", "type", "code"}}` event.
- A client that leaves stops the request's Dynamo context; the worker then cancels its gRPC stream, which frees
  the request's KV on the model at its next step.
- KV events (kv.py): the model's prefix cache reports pages stored and evicted on a gRPC stream; the worker
  publishes them to Dynamo's KV router (with a local indexer, so a router that starts later still learns them).
- Triton gone for good (three failed readiness checks in a row): the worker unregisters and exits, so Dynamo
  stops routing here and `--migration-limit` moves interrupted streams to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import NLDError
from ..openai.mapping import RequestError, TritonRequest, triton_requests
from ..openai.triton import ModelError, ModelInfo, Piece, TritonBridge, TritonUnavailable
from .request import describe, leading_special_tokens

log = logging.getLogger("nld_trt.dynamo")

FINISH = {"eos": "eos", "stop": "stop", "length": "length", "cancelled": "cancelled"}  # model -> Dynamo
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HEALTH_EVERY_S = 2.0
HEALTH_FAILURES = 3  # readiness checks in a row before the worker gives up on its tritonserver
PROBE_TEXT = "Tom has 3 apples [INST] and 4 pears. 你好 ✓"  # the tokenizer check: ASCII, special-token text, unicode


@dataclass
class WorkerOptions:
    triton_url: str  # host:port of tritonserver's gRPC endpoint
    model_dir: Path  # tokenizer.json, tokenizer_config.json, the chat template (the checkpoint, or REPO/nld/1/artifacts)
    served_model_name: str = "nld"
    triton_model: str = "nld"
    endpoint: str = "nld.backend.generate"  # namespace.component.endpoint
    discovery_backend: str = "file"  # file (one machine), etcd or kubernetes (several)
    request_plane: str = "tcp"
    kv_events: bool = True
    ready_timeout: float = 600.0
    grace_period: float | None = None  # seconds between unregistering and stopping (None: Dynamo's default, 5 s)
    reasoning_parser: str | None = None  # Dynamo's parser that splits the thinking off as reasoning_content


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    missing = [f for f in TOKENIZER_FILES if not (model_dir / f).is_file()]
    if missing:
        raise NLDError(f"--model-dir {model_dir} lacks {', '.join(missing)}: give the served checkpoint's directory "
                       "(or the repository's nld/1/artifacts), whose tokenizer and chat template Dynamo's frontend uses")
    return model_dir


def dynamo_chunk(piece: Piece, logprobs: bool, top: int) -> dict[str, Any]:
    """One Triton response as the chunk a Dynamo token worker yields."""
    chunk: dict[str, Any] = {"token_ids": list(piece.token_ids), "index": piece.index}
    if logprobs and piece.logprobs is not None:
        chunk["log_probs"] = [e["logprob"] for e in piece.logprobs]
        if top:
            chunk["top_logprobs"] = [[{"rank": r + 1, "token_id": t["token_id"], "token": t["token"],
                                       "logprob": t["logprob"]} for r, t in enumerate(e.get("top_logprobs") or [])]
                                     for e in piece.logprobs]
    if piece.finish_reason:
        chunk["finish_reason"] = FINISH.get(piece.finish_reason, piece.finish_reason)
        stats = piece.stats or {}
        prompt = stats.get("prompt_tokens", piece.prompt_tokens)
        tokens = int(stats.get("tokens", piece.num_tokens))
        if prompt is not None:
            usage: dict[str, Any] = {"prompt_tokens": int(prompt), "completion_tokens": tokens,
                                     "total_tokens": int(prompt) + tokens}
            if stats.get("cached_tokens") is not None:
                usage["prompt_tokens_details"] = {"cached_tokens": int(stats["cached_tokens"])}
            chunk["completion_usage"] = usage
    return chunk


class NLDWorker:
    """The request handler and what it needs: the bridge, the served model's inputs, the prompt prefix."""

    def __init__(self, bridge: TritonBridge, info: ModelInfo, bos: list[int]) -> None:
        self.bridge, self.info, self.bos = bridge, info, bos

    def requests(self, request: dict[str, Any]) -> tuple[TritonRequest, bool, int]:
        generation, prompt, outputs = describe(request, self.bos)
        return triton_requests(generation, [prompt], outputs, self.info)[0], outputs.logprobs, outputs.top_logprobs

    async def generate(self, request: dict[str, Any], context: Any) -> AsyncIterator[dict[str, Any]]:
        from dynamo.llm.exceptions import InvalidArgument

        try:
            triton, logprobs, top = self.requests(request)
        except RequestError as e:
            raise InvalidArgument(e.message) from None
        # done once Dynamo stops or kills the request's context (the client left, or a stop string ended it)
        stopped = asyncio.ensure_future(context.async_killed_or_stopped())
        stream = self.bridge.generate(triton.fields, triton.sequences)
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the client left: cancelling the step cancels the gRPC stream (KV freed)
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    return
                try:
                    piece = step.result()
                except StopAsyncIteration:
                    return
                except ModelError as e:
                    message = str(e)
                    if message.startswith("internal error") or "being unloaded" in message:
                        raise RuntimeError(message) from None  # Dynamo: HTTP 500
                    raise InvalidArgument(message) from None
                except TritonUnavailable as e:
                    raise RuntimeError(str(e)) from None
                yield dynamo_chunk(piece, logprobs, top)
        finally:
            stopped.cancel()
            await stream.aclose()


async def wait_ready(bridge: TritonBridge, timeout: float) -> ModelInfo:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await bridge.ready():
        if asyncio.get_running_loop().time() > deadline:
            raise NLDError(f"tritonserver at {bridge.url} was not ready to serve model {bridge.model!r} after "
                           f"{timeout:.0f} s: start it first (nld-trt serve REPO)")
        await asyncio.sleep(0.5)
    return await bridge.info()


async def check_tokenizer(bridge: TritonBridge, model_dir: Path) -> list[int]:
    """The leading special tokens of a raw encode (BOS), after checking that --model-dir's tokenizer is the served
    model's: the deployment's tokenizer model and the local files must encode a probe text alike."""
    from ...tokenizer import NLDTokenizer
    from ..openai.triton import NoTokenizer

    local = NLDTokenizer(model_dir)
    try:
        served = await bridge.tokenizer({"text_input": PROBE_TEXT, "add_special_tokens": True}, ["token_ids"])
    except NoTokenizer:
        log.warning("the deployment has no tokenizer model (packaged by an older nld-trt): cannot check that "
                    "--model-dir holds the served model's tokenizer")
    else:
        ids = [int(t) for t in served.get("token_ids", [])]
        if ids != local.encode(PROBE_TEXT):
            raise NLDError(f"--model-dir {model_dir} does not hold the served model's tokenizer: a probe text "
                           "encodes differently there and on the deployment; give the served checkpoint's directory")
    return leading_special_tokens(local.encode)


async def watch_triton(bridge: TritonBridge, shutdown: Any) -> None:
    """Shut the worker down when its tritonserver stays unready (so Dynamo routes elsewhere)."""
    failures = 0
    while True:
        await asyncio.sleep(HEALTH_EVERY_S)
        failures = 0 if await bridge.ready() else failures + 1
        if failures >= HEALTH_FAILURES:
            log.error("tritonserver at %s is gone: unregistering and stopping this worker", bridge.url)
            await shutdown()
            return


def kv_pages(info: ModelInfo, page: int) -> int | None:
    """The model instance's KV pages, from its package options (None when sized in GiB: known only at load)."""
    try:
        if float(info.parameters.get("kv_cache_gb") or 0):
            return None
    except ValueError:
        return None
    tokens = info.limit("kv_cache_tokens", 0) or info.limit("max_batch", 0) * info.limit("max_seq_len", 0)
    return -(-tokens // page) or None


def instance_count(config: dict[str, Any]) -> int:
    return sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1


async def serve(options: WorkerOptions, announce: Any = None) -> None:
    """Register the deployment's model with Dynamo and serve until SIGTERM/SIGINT (or its tritonserver is gone)."""
    from dynamo.common.utils.graceful_shutdown import graceful_shutdown_with_discovery, install_signal_handlers
    from dynamo.common.utils.runtime import create_runtime
    from dynamo.llm import ModelInput, ModelRuntimeConfig, ModelType, WorkerType, register_model

    model_dir = check_model_dir(options.model_dir)
    bridge = TritonBridge(options.triton_url, options.triton_model)
    info = await wait_ready(bridge, options.ready_timeout)
    bos = await check_tokenizer(bridge, model_dir)
    config = (await bridge.client().get_model_config(options.triton_model, as_json=True, client_timeout=10))["config"]
    instances = instance_count(config)
    page = info.limit("page_size", 16)

    runtime, loop = create_runtime(discovery_backend=options.discovery_backend, request_plane=options.request_plane)
    endpoint = runtime.endpoint(options.endpoint)
    stopping = asyncio.Event()

    async def shutdown() -> None:  # as on SIGTERM: unregister (routers stop sending), then stop the runtime
        await graceful_shutdown_with_discovery(runtime, [endpoint], shutdown_event=stopping,
                                               grace_period_s=options.grace_period)

    install_signal_handlers(loop, runtime, [endpoint], shutdown_event=stopping, grace_period_s=options.grace_period)
    rc = ModelRuntimeConfig()
    rc.context_length = info.limit("max_seq_len", 0) or None
    rc.max_num_seqs = info.limit("max_batch", 0) * instances or None
    rc.total_kv_blocks = kv_pages(info, page)
    rc.enable_local_indexer = True
    rc.reasoning_parser = options.reasoning_parser
    await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, endpoint, str(model_dir),
                         options.served_model_name, worker_type=WorkerType.Aggregated, kv_cache_block_size=page,
                         runtime_config=rc)
    worker = NLDWorker(bridge, info, bos)
    tasks = [asyncio.ensure_future(watch_triton(bridge, shutdown))]
    if options.kv_events:
        from .kv import relay_kv_events

        if instances > 1:
            log.warning("model %s has %d instances, each with its own KV cache: the router sees the events of the "
                        "instance that serves the subscription only (deploy one instance per tritonserver for KV "
                        "routing)", options.triton_model, instances)
        tasks.append(asyncio.ensure_future(relay_kv_events(bridge, endpoint, page, stopping)))
    if announce is not None:
        announce(f"worker {endpoint.connection_id()} (pid {os.getpid()}) serving model {options.served_model_name!r} "
                 f"for tritonserver {options.triton_url}: page size {page}, context {rc.context_length}, "
                 f"leading special tokens {bos}")
    try:
        await endpoint.serve_endpoint(worker.generate)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bridge.close()
