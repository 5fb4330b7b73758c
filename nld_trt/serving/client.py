"""Clients of an nld-trt Triton deployment: gRPC (streaming and unary) and HTTP (generate, generate_stream).

Request fields are the model's input names (`text_input`, `max_tokens`, `mode`, ...; see protocol.py).
Streaming yields a `Chunk` per decoding step; closing the iterator early cancels the request on the
server (gRPC), which frees its KV slot.
"""

from __future__ import annotations

import contextlib
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NLDError
from .protocol import INPUT_TYPES

STREAM_MODEL, SYNC_MODEL = "nld", "nld_sync"
NUMPY_TYPES = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64,
               "UINT64": np.uint64, "FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


class ClientError(NLDError):
    """The server refused the request or could not be reached; the message is the server's."""


@dataclass
class Chunk:
    """One response: the new text and ids (a delta when streaming) and the counters so far."""

    text: str
    token_ids: list[int]
    num_tokens: int
    nfe: int
    tpf: float
    finish_reason: str = ""
    stats: dict[str, Any] | None = None
    logprobs: list[dict[str, Any]] | None = None  # with return_log_probs: one entry per token id
    sequence_index: int = 0
    prompt_logprobs: list[dict[str, Any]] | None = None  # with prompt_logprobs: one entry per prompt token

    @property
    def final(self) -> bool:
        return self.stats is not None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict[str, Any]
    chunks: list[Chunk] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any]] | None = None

    @classmethod
    def join(cls, chunks: list[Chunk]) -> Result:
        if not chunks or not chunks[-1].final:
            raise ClientError("the stream ended without a final response")
        logprobs = None if chunks[-1].logprobs is None else [e for c in chunks for e in c.logprobs or []]
        prompt = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
        return cls("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                   chunks[-1].finish_reason, chunks[-1].stats or {}, chunks, logprobs, prompt)


def _value(name: str, array: Any) -> Any:
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if name == "output_ids":
        return [int(x) for x in flat]
    v = flat[0] if flat.size else b""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v.item() if hasattr(v, "item") else v


def chunk_from(get: Any) -> Chunk:
    """A Chunk from an accessor name -> array (tritonclient's as_numpy) or JSON value."""
    stats = _value("stats", get("stats"))
    logprobs = _value("logprobs", get("logprobs"))
    prompt = _value("prompt_logprobs", get("prompt_logprobs"))
    return Chunk(
        text=_value("text_output", get("text_output")) or "",
        token_ids=_value("output_ids", get("output_ids")) or [],
        num_tokens=int(_value("num_tokens", get("num_tokens")) or 0),
        nfe=int(_value("nfe", get("nfe")) or 0),
        tpf=float(_value("tpf", get("tpf")) or 0.0),
        finish_reason=_value("finish_reason", get("finish_reason")) or "",
        stats=json.loads(stats) if stats else None,
        logprobs=json.loads(logprobs) if logprobs else None,
        sequence_index=int(_value("sequence_index", get("sequence_index")) or 0),
        prompt_logprobs=json.loads(prompt) if prompt else None,
    )


IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp"}


def data_url(path: Any) -> str:
    """An image file as a data URL (what `image_url_input` carries; the server decodes and checks it)."""
    import base64
    from pathlib import Path

    path = Path(path)
    media = IMAGE_TYPES.get(path.suffix.lower(), "image/png")
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def grpc_inputs(fields: dict[str, Any]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in fields.items():
        if value is None:
            continue
        if name not in INPUT_TYPES:
            raise ClientError(f"unknown input {name!r}: choose from {', '.join(INPUT_TYPES)}")
        spec = INPUT_TYPES[name]
        wire = spec.wire_type
        if spec.kind == "array":  # image pixels [images, H, W, 3], image sizes [images, 2]: one request's, as they are
            array = np.asarray(value, dtype=NUMPY_TYPES[wire])[None]
        else:
            items = list(value) if spec.kind in ("list", "words") else [value]
            items = [v.encode("utf-8") if wire == "BYTES" and isinstance(v, str) else v for v in items]
            array = np.array([items], dtype=NUMPY_TYPES[wire])  # [1, 1], or [1, N] for a list input, [1, 2, N] words
        tensor = grpcclient.InferInput(name, list(array.shape), wire)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


CHUNK_OUTPUTS = ("text_output", "output_ids", "num_tokens", "nfe", "tpf", "finish_reason", "stats", "sequence_index")


def requested(fields: dict[str, Any]) -> list[Any]:
    """The outputs a Chunk reads (the server builds only what is asked for)."""
    import tritonclient.grpc as grpcclient

    names = list(CHUNK_OUTPUTS) + (["logprobs"] if fields.get("return_log_probs") else []) + (
        ["prompt_logprobs"] if fields.get("prompt_logprobs") is not None else [])
    return [grpcclient.InferRequestedOutput(n) for n in names]


class _Connection:
    """One gRPC connection and its bidirectional stream, kept open between requests (opening them costs a
    few milliseconds per request). It carries one request at a time, so stopping its stream cancels just
    that request."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.streaming = False

    def start(self) -> None:
        if not self.streaming:
            self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
            self.streaming = True

    def stop(self, cancel: bool) -> None:
        if self.streaming:
            self.client.stop_stream(cancel_requests=cancel)
            self.streaming = False
            self.responses = queue.Queue()

    def close(self) -> None:
        self.stop(cancel=False)
        self.client.close()


class GrpcClient:
    """Calls from any number of threads. Connections are pooled: a request takes one for its duration; one
    that stops early cancels its stream, which cancels that request alone.

    `keep_streams`: also keep each connection's stream open between requests, as benchmark clients do (it
    saves a few milliseconds per request); an open stream keeps tritonserver from stopping until its exit
    timeout, so such a client must be closed (`close()`, or use it as a context manager)."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float = 300.0, keep_streams: bool = False) -> None:
        self.url = url
        self.timeout = timeout
        self.keep_streams = keep_streams
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = _Connection(self.url)
        try:
            yield conn
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        """Close the idle connections."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def stream(self, model: str = STREAM_MODEL, parameters: dict | None = None, **fields: Any) -> Iterator[Chunk]:
        """Yield one Chunk per response until the final one. Stopping early cancels the request."""
        with self._connection() as conn:
            yield from self._stream(conn, model, parameters, fields)

    def _stream(self, conn: _Connection, model: str, parameters: dict | None, fields: dict[str, Any]) -> Iterator[Chunk]:
        from tritonclient.utils import InferenceServerException

        conn.start()
        # Cancel on the server only a request still running there: tritonserver 2.51 sometimes never
        # releases a finished request that its client then cancels, and the model cannot unload.
        complete = False
        try:
            conn.client.async_stream_infer(model, grpc_inputs({"stream": True, **fields}), outputs=requested(fields),
                                           enable_empty_final_response=True, parameters=parameters)
            while True:
                try:
                    result, error = conn.responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise ClientError(f"no response from {self.url} in {self.timeout:.0f} s") from None
                if error is not None:
                    complete = True  # an error response is final
                    raise ClientError(error.message() if isinstance(error, InferenceServerException) else str(error))
                response = result.get_response()
                complete = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    yield chunk_from(result.as_numpy)
                if complete:
                    return
        finally:
            if not complete:  # the caller stopped early (or an error): this request alone is cancelled
                conn.stop(cancel=True)
            elif not self.keep_streams:
                conn.stop(cancel=False)

    def generate(self, model: str = STREAM_MODEL, **fields: Any) -> Result:
        """A streamed request collected into one Result."""
        return Result.join(list(self.stream(model, **fields)))

    def infer(self, model: str = SYNC_MODEL, parameters: dict | None = None, **fields: Any) -> Result:
        """Unary infer (the non-decoupled model)."""
        from tritonclient.utils import InferenceServerException

        with self._connection() as conn:
            try:
                result = conn.client.infer(model, grpc_inputs(fields), outputs=requested(fields), parameters=parameters,
                                           client_timeout=self.timeout)
            except InferenceServerException as e:
                raise ClientError(e.message()) from None
        return Result.join([chunk_from(result.as_numpy)])


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise ClientError(_http_error(e.read())) from None
    except urllib.error.URLError as e:
        raise ClientError(f"cannot reach {url}: {e.reason}") from None


def _http_error(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


def _body(fields: dict[str, Any], parameters: dict | None) -> dict[str, Any]:
    body = {k: v for k, v in fields.items() if v is not None}
    if parameters:
        body["parameters"] = parameters
    return body


def http_generate(url: str = "127.0.0.1:8000", model: str = SYNC_MODEL, parameters: dict | None = None,
                  timeout: float = 300.0, **fields: Any) -> Result:
    """POST /v2/models/MODEL/generate: one JSON answer."""
    with _post(f"http://{url}/v2/models/{model}/generate", _body(fields, parameters), timeout) as r:
        data = json.loads(r.read())
    if "error" in data:
        raise ClientError(data["error"])
    return Result.join([chunk_from(data.get)])


def http_generate_stream(url: str = "127.0.0.1:8000", model: str = STREAM_MODEL, parameters: dict | None = None,
                         timeout: float = 300.0, **fields: Any) -> Iterator[Chunk]:
    """POST /v2/models/MODEL/generate_stream: one Chunk per server-sent event."""
    with _post(f"http://{url}/v2/models/{model}/generate_stream", _body({"stream": True, **fields}, parameters),
               timeout) as r:
        for raw in r:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            if "error" in data:
                raise ClientError(data["error"])
            chunk = chunk_from(data.get)
            yield chunk
            if chunk.final:
                return
