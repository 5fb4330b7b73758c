"""The OpenAI-compatible HTTP front end: FastAPI routes over the Triton bridge, and the web chat page.

`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health` (and `/v1/health`),
vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (answered by the repository's tokenizer
model, so lm-eval's `local-completions` needs no tokenizer files), and the chat page at `/`. Each request is
validated (schema.py), becomes one gRPC stream per prompt to the decoupled model (triton.py), and its
responses are reshaped into OpenAI's objects: one JSON answer, or
Server-Sent Events `chat.completion.chunk` / `text_completion` chunks ending with `data: [DONE]`.

A streaming request waits for the model's first response before it answers, so a request the model
refuses still gets an HTTP error status. A client that goes away (mid-stream or while waiting for a unary
answer) cancels its gRPC streams, which frees its KV slots. Request bodies are capped.

A chat request with images (OpenAI's `image_url` parts) is checked against what the served model's config says,
its allowed http(s) images are fetched (media.py), and they go to the model inline
(schema.chat_request_with_images).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .media import MAX_BODY_BYTES, MediaOptions
from .schema import (ChatRequest, CompletionRequest, DetokenizeRequest, RequestError, TritonRequest,
                     chat_request_with_images, completion_requests, parse, parse_tokenize, tokenize_fields)
from .triton import ModelError, ModelInfo, NoTokenizer, Piece, TritonBridge, TritonUnavailable, first_string

log = logging.getLogger("nld_trt.serving.openai")

PART = re.compile(r"^(messages\[\d+\]\.content\[\d+\])")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# a model error's first word -> the OpenAI field it is about
PARAMS = {"max_tokens": "max_tokens", "block_length": "block_length", "threshold": "threshold",
          "temperature": "temperature", "seed": "seed", "mode": "mode", "top_p": "top_p", "top_k": "top_k",
          "min_p": "min_p", "stop_words": "stop", "stop_token_ids": "stop_token_ids", "messages": "messages",
          "text_input": "prompt", "input_ids": "prompt", "num_return_sequences": "n", "top_logprobs": "top_logprobs",
          "max_thinking_tokens": "max_thinking_tokens", "chat_template_kwargs": "chat_template_kwargs"}


def model_error(e: ModelError, chat: bool) -> RequestError:
    """A refusal from the model as an OpenAI error: 400 naming the field where the message does."""
    message = str(e)
    if message.startswith("internal error"):
        return RequestError(message, status=500, type="server_error")
    if "being unloaded" in message:
        return RequestError(message, status=503, type="server_error", code="service_unavailable")
    part = PART.match(message)
    if part:  # an image part the model refused (bad image, too large, ...)
        return RequestError(message, param=part.group(1))
    words = message.replace("(", " ").split()
    param = next((PARAMS[w] for w in words[:2] if w in PARAMS), None)
    if param is None and message.startswith(("the prompt", "unknown mode", "prompt token")):
        param = {"unknown": "mode"}.get(words[0], "messages" if chat else "prompt")
    if param == "prompt" and chat:
        param = "messages"
    return RequestError(message, param=param)


def unavailable(e: TritonUnavailable) -> RequestError:
    return RequestError(str(e), status=503, type="server_error", code="service_unavailable")


# collecting a request's sequences ---------------------------------------------------------------------
@dataclass
class Choice:
    """One returned sequence, as its pieces arrive."""

    index: int
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    nfe: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    echo: str = ""  # completions with echo: the prompt's text, before the generated text
    prompt_logprobs: list[dict[str, Any]] | None = None  # every prompt token (the first without a logprob)
    started: bool = False  # streaming: its first chunk went out
    cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache (final stats)

    def add(self, piece: Piece) -> None:
        if piece.prompt_logprobs is not None:
            self.prompt_logprobs = piece.prompt_logprobs
        self.text.append(piece.text)
        if piece.reasoning:
            self.reasoning.append(piece.reasoning)
        if piece.logprobs:
            self.logprobs.extend(piece.logprobs)
        self.tokens, self.nfe = piece.num_tokens, piece.nfe
        if piece.prompt_tokens is not None:
            self.prompt_tokens = piece.prompt_tokens
        if piece.finish_reason:
            self.finish_reason = FINISH.get(piece.finish_reason, piece.finish_reason)
            stats = piece.stats or {}
            self.tokens, self.nfe = int(stats.get("tokens", self.tokens)), int(stats.get("nfe", self.nfe))
            self.prompt_tokens = stats.get("prompt_tokens", self.prompt_tokens)
            self.cached_tokens = stats.get("cached_tokens", self.cached_tokens)


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """OpenAI usage plus NLD's nfe (forward passes, summed over sequences) and tpf (tokens per pass).

    The prompt counts once per prompt however many sequences it has (n of them per prompt), and so do its
    cached tokens (`prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache supplied to the
    prompt's first sequence; the others share its pages), known once the sequences finish."""
    prompt = [c.prompt_tokens for c in choices[::n]]
    cached = [c.cached_tokens for c in choices[::n]]
    completion = sum(c.tokens for c in choices)
    nfe = sum(c.nfe for c in choices)
    prompt_tokens = None if None in prompt else sum(prompt)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
           "total_tokens": None if prompt_tokens is None else prompt_tokens + completion,
           "nfe": nfe, "tpf": round(completion / nfe, 4) if nfe else 0.0}
    if None not in cached:
        out["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    return out


async def pieces(bridge: TritonBridge, requests: list[TritonRequest]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) from every prompt's stream, as they arrive; choice = prompt * n + sequence.

    Closing this iterator (or cancelling its consumer) cancels every stream still running."""
    if len(requests) == 1:
        async with contextlib.aclosing(bridge.generate(requests[0].fields, requests[0].sequences)) as stream:
            async for piece in stream:
                yield piece.index, piece
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, r: TritonRequest) -> None:
        try:
            async with contextlib.aclosing(bridge.generate(r.fields, r.sequences)) as stream:
                async for piece in stream:
                    queue.put_nowait((i * r.sequences + piece.index, piece))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# OpenAI shapes ----------------------------------------------------------------------------------------
def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes")}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.get("top_logprobs") or []]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]], offset: int, top: int) -> dict[str, Any]:
    """The legacy completions layout; text_offset counts characters from the start of the choice's text. An
    echoed prompt's first token has no log-probability (null, as OpenAI and vLLM send it)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["logprob"] is None else
                             {t["token"]: t["logprob"] for t in (e.get("top_logprobs") or [])[:top]} for e in entries]
            if top else None,
            "text_offset": offsets}


def vllm_prompt_logprobs(entries: list[dict[str, Any]] | None, top: int) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first) {token id: {logprob, rank, decoded_token}}
    for the token itself and the `top` most likely ones."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = [None]
    for e in entries[1:]:
        d = {str(t["token_id"]): {"logprob": t["logprob"], "rank": r + 1, "decoded_token": t["token"]}
             for r, t in enumerate((e.get("top_logprobs") or [])[:top])}
        d[str(e["token_id"])] = {"logprob": e["logprob"], "rank": e.get("rank"), "decoded_token": e["token"]}
        out.append(d)
    return out


@dataclass
class Shape:
    """The OpenAI object names and per-endpoint fields of one request."""

    chat: bool
    model: str
    n: int
    top_logprobs: int  # completions: the logprobs count; chat: top_logprobs
    logprobs: bool
    echo: bool = False  # completions: the prompt comes first (its log-probabilities too, with logprobs)
    prompt_top: int | None = None  # vLLM's prompt_logprobs: asked for, with this many alternatives
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def answer(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            text = "".join(c.text)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if c.reasoning:
                    message["reasoning_content"] = "".join(c.reasoning)
                lp = chat_logprobs(c.logprobs) if self.logprobs else None
                out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                entries = (c.prompt_logprobs or []) + c.logprobs if self.echo else c.logprobs
                lp = completion_logprobs(entries, 0, self.top_logprobs) if self.logprobs else None
                out.append({"index": c.index, "text": c.echo + text if self.echo else text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
                if self.prompt_top is not None:
                    out[-1]["prompt_logprobs"] = vllm_prompt_logprobs(c.prompt_logprobs, self.prompt_top)
        answer = {**self.head("chat.completion" if self.chat else "text_completion"), "choices": out,
                  "usage": usage(choices, self.n), "system_fingerprint": None}
        if self.chat and self.prompt_top is not None:  # vLLM puts the chat prompt's once, beside the choices
            answer["prompt_logprobs"] = vllm_prompt_logprobs(choices[0].prompt_logprobs, self.prompt_top)
        return answer

    def first_chunk(self, choice: Choice) -> dict[str, Any] | None:
        """Completions streaming, before a choice's first text: the echoed prompt and its log-probabilities, and
        vLLM's prompt_logprobs (None when neither is asked for)."""
        if self.chat or not (self.echo or self.prompt_top is not None):
            return None
        lp = (completion_logprobs(choice.prompt_logprobs or [], 0, self.top_logprobs)
              if self.echo and self.logprobs else None)
        body: dict[str, Any] = {"index": choice.index, "text": choice.echo if self.echo else "", "logprobs": lp,
                                "finish_reason": None}
        if self.prompt_top is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(choice.prompt_logprobs, self.prompt_top)
        return {**self.head("text_completion"), "choices": [body], "system_fingerprint": None}

    def chunk(self, choice: Choice, piece: Piece | None, offset: int) -> dict[str, Any]:
        """One choice's chunk: the piece's delta, or (piece None) its finish."""
        if self.chat:
            delta: dict[str, Any] = {}
            if piece is not None and piece.reasoning:
                delta["reasoning_content"] = piece.reasoning
            if piece is not None and (piece.text or not delta):
                delta["content"] = piece.text
            lp = chat_logprobs(piece.logprobs) if piece is not None and self.logprobs and piece.logprobs else None
            body = {"index": choice.index, "delta": delta, "logprobs": lp,
                    "finish_reason": None if piece is not None else choice.finish_reason}
        else:
            lp = (completion_logprobs(piece.logprobs, offset, self.top_logprobs)
                  if piece is not None and self.logprobs and piece.logprobs else None)
            body = {"index": choice.index, "text": "" if piece is None else piece.text, "logprobs": lp,
                    "finish_reason": None if piece is not None else choice.finish_reason}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(obj), "choices": [body], "system_fingerprint": None}

    def role_chunk(self, index: int) -> dict[str, Any]:
        body = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return {**self.head("chat.completion.chunk"), "choices": [body], "system_fingerprint": None}


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class EventStream(StreamingResponse):
    """SSE whose producer is cancelled as soon as the client disconnects, even between events (Starlette
    notices a disconnect only on the next write under ASGI 2.4; a request waiting for a KV slot writes
    nothing for a while)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        producer = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((producer, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:  # the client left (or the server stops): cancelling the producer cancels its gRPC streams
            for task in (producer, listener):
                task.cancel()
            results = await asyncio.gather(producer, listener, return_exceptions=True)
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, (asyncio.CancelledError, OSError)):
            raise error


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# the app ------------------------------------------------------------------------------------------------
def create_app(bridge: TritonBridge, served_model: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               media_options: MediaOptions = MediaOptions()) -> FastAPI:
    """The front end for one Triton model; `served_model` is the OpenAI model id (default: its Triton name);
    `media_options`: which image URLs it may fetch."""
    served = served_model or bridge.model
    started = int(time.time())
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await bridge.close()

    app = FastAPI(title="nld-trt OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}: this server has /v1/models, "
                        "/v1/chat/completions, /v1/completions, /tokenize, /detokenize, /tokenizer_info, /health and "
                        "the chat page at /",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(RequestError(message, status=e.status_code, code="not_found" if e.status_code == 404
                                         else None).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("front end failed on %s", request.url.path)
        error = RequestError(f"internal error in the OpenAI front end ({type(e).__name__}: {e}): retry the request",
                             status=500, type="server_error")
        return JSONResponse(error.body(), status_code=500)

    async def info() -> ModelInfo:
        try:
            return await bridge.info()
        except TritonUnavailable as e:
            raise unavailable(e) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != served:
            raise RequestError(f"the model {name!r} does not exist: this server serves {served!r} (GET /v1/models)",
                               param="model", status=404, code="model_not_found")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        if not await bridge.ready():
            raise unavailable(TritonUnavailable(f"tritonserver at {bridge.url} is not ready to serve model "
                                                f"{bridge.model!r}"))
        return JSONResponse({"status": "ok", "model": served})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card: dict[str, Any] = {"id": served, "object": "model", "created": started, "owned_by": "nld-trt"}
        with contextlib.suppress(TritonUnavailable):
            card["max_model_len"] = (await bridge.info()).limit("max_seq_len", 0) or None
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse(ChatRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        triton = [await chat_request_with_images(req, await info(), media_options)]
        shape = Shape(True, served, req.n, req.top_logprobs or 0, req.logprobs, prompt_top=req.prompt_logprobs)
        return await respond(request, req, triton, shape)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        triton = completion_requests(req, await info())
        shape = Shape(False, served, req.n, req.logprobs or 0, req.logprobs is not None, req.echo, req.prompt_logprobs)
        echoes = [await echo_text(p) for p in req.prompts()] if req.echo else None
        return await respond(request, req, triton, shape, echoes)

    async def echo_text(prompt: str | list[int]) -> str:
        """The text an echoed prompt starts the answer with: a text prompt as sent, token ids decoded by the
        model's tokenizer (never re-tokenized: the model still gets the ids)."""
        if isinstance(prompt, str):
            return prompt
        out = await tokenizer_call({"input_ids": list(prompt)}, ["text_output"], "prompt")
        return first_string(out.get("text_output"))

    async def tokenizer_call(fields: dict[str, Any], wanted: list[str], param: str | None) -> dict[str, list]:
        try:
            return await bridge.tokenizer(fields, wanted)
        except NoTokenizer as e:
            raise RequestError(str(e), param=param, status=501, type="server_error", code="not_implemented") from None
        except ModelError as e:
            raise RequestError(str(e), param=param) from None
        except TritonUnavailable as e:
            raise unavailable(e) from None

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = parse_tokenize(await read_body(request, max_body_bytes))
        check_model(req.model)
        wanted = ["token_ids"] + (["token_strs"] if req.return_token_strs else [])
        out = await tokenizer_call(tokenize_fields(req), wanted, "messages" if hasattr(req, "messages") else "prompt")
        tokens = [int(t) for t in out.get("token_ids", [])]
        strs = [t.decode("utf-8", errors="replace") for t in out.get("token_strs", [])] if req.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": (await info()).limit("max_seq_len", 0) or None,
                             "tokens": tokens, "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse(DetokenizeRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        out = await tokenizer_call({"input_ids": req.tokens}, ["text_output"], "tokens")
        return JSONResponse({"prompt": first_string(out.get("text_output"))})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        out = await tokenizer_call({"add_special_tokens": False}, ["tokenizer_info"], None)
        return JSONResponse(json.loads(first_string(out.get("tokenizer_info")) or "{}"))

    async def respond(request: Request, req: ChatRequest | CompletionRequest, triton: list[TritonRequest],
                      shape: Shape, echoes: list[str] | None = None) -> Response:
        choices = [Choice(i) for i in range(len(triton) * req.n)]
        for c in choices if echoes is not None else ():
            c.echo = echoes[c.index // req.n]
        stream = pieces(bridge, triton)
        if req.stream:
            return await stream_answer(stream, choices, shape, req)
        collect = asyncio.create_task(collect_answer(stream, choices, shape))
        watch = asyncio.create_task(until_disconnect(request))
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if not collect.done():  # the client left: cancel its streams, which frees their KV slots
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect
            return Response(status_code=499)
        return JSONResponse(collect.result())

    async def collect_answer(stream: AsyncIterator[tuple[int, Piece]], choices: list[Choice],
                             shape: Shape) -> dict[str, Any]:
        try:
            async with contextlib.aclosing(stream):
                async for index, piece in stream:
                    choices[index].add(piece)
        except ModelError as e:
            raise model_error(e, shape.chat) from None
        except TritonUnavailable as e:
            raise unavailable(e) from None
        return shape.answer(choices)

    async def stream_answer(stream: AsyncIterator[tuple[int, Piece]], choices: list[Choice], shape: Shape,
                            req: ChatRequest | CompletionRequest) -> Response:
        options = req.stream_options
        include_usage = options is not None and (options.include_usage or options.continuous_usage_stats)
        continuous = options is not None and options.continuous_usage_stats
        try:  # the first response decides the status: a refused request gets its error as HTTP 400
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except ModelError as e:
            await stream.aclose()
            raise model_error(e, shape.chat) from None
        except TritonUnavailable as e:
            await stream.aclose()
            raise unavailable(e) from None

        def event(chunk: dict[str, Any]) -> bytes:
            if include_usage:
                chunk["usage"] = usage(choices, shape.n) if continuous else None
            return sse(chunk)

        async def events() -> AsyncIterator[bytes]:
            offsets = [0] * len(choices)
            async with contextlib.aclosing(stream):
                if shape.chat:
                    for c in choices:
                        yield event(shape.role_chunk(c.index))
                try:
                    item = first
                    while item is not None:
                        index, piece = item
                        choice = choices[index]
                        choice.add(piece)
                        if not choice.started:
                            choice.started = True
                            opening = shape.first_chunk(choice)
                            if opening is not None:
                                yield event(opening)
                                offsets[index] += len(opening["choices"][0]["text"])
                        if piece.text or piece.reasoning or piece.logprobs:
                            yield event(shape.chunk(choice, piece, offsets[index]))
                            offsets[index] += len(piece.text)
                        if piece.finish_reason:
                            yield event(shape.chunk(choice, None, offsets[index]))
                        item = await anext(stream, None)
                except (ModelError, TritonUnavailable) as e:
                    error = model_error(e, shape.chat) if isinstance(e, ModelError) else unavailable(e)
                    yield sse(error.body())
                    yield sse("[DONE]")
                    return
            if include_usage:
                yield sse({**shape.head(f"{'chat.completion.chunk' if shape.chat else 'text_completion'}"),
                           "choices": [], "usage": usage(choices, shape.n), "system_fingerprint": None})
            yield sse("[DONE]")

        return EventStream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 past `cap` bytes (before reading it when Content-Length says so)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _too_large(int(length), cap)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise _too_large(total, cap)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, cap: int) -> RequestError:
    return RequestError(f"the request body ({size} bytes or more) is over this server's limit of {cap} bytes: send a "
                        "shorter request, or start the server with a larger --max-body-bytes",
                        status=413, code="request_too_large")
