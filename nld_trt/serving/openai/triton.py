"""The async gRPC bridge from the OpenAI front end to the decoupled Triton model `nld`.

Every OpenAI request, unary or streaming, becomes one gRPC stream (`tritonclient.grpc.aio`) to the model
with stream=true, so Triton stays the serving engine and the front end only reshapes its responses. The
bridge reads the served model's config once (which inputs it has, its limits) and sends each field with the
type the config declares, so a model that gains inputs (top_p, stop_words, ...) needs no change here.

The bridge also calls the repository's tokenizer model (`nld_tokenizer`, named by the model's
`tokenizer_model` parameter) for `/tokenize`, `/detokenize`, `/tokenizer_info` and echoed token-id prompts: the
front end needs only Triton's gRPC address, never the model's files.

A request the caller abandons (its HTTP client went away, or the task was cancelled) cancels its gRPC
stream, which frees its KV slot on the server. A finished request is never cancelled: tritonserver 2.51 may
then keep it forever (see client.py); its stream is drained in the background instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODEL = "nld"
NUMPY = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64,
         "FP32": np.float32}
DRAIN_S = 30.0  # how long a finished request's stream may take to close before it is cancelled after all


class TritonUnavailable(Exception):
    """tritonserver cannot be reached, or the model is not loaded (HTTP 503)."""


class ModelError(Exception):
    """The model refused or failed a request; the message is the model's."""


class NoTokenizer(Exception):
    """The served repository has no tokenizer model (packaged by an older nld-trt)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the served model accepts, from its Triton config."""

    name: str
    inputs: dict[str, str]  # input name -> wire datatype (BYTES, INT32, ...)
    parameters: dict[str, str]
    batched: bool  # max_batch_size > 0: every tensor has a leading batch dimension of 1

    def has(self, name: str) -> bool:
        return name in self.inputs

    def limit(self, key: str, default: int) -> int:
        try:
            return int(self.parameters.get(key, default))
        except ValueError:
            return default

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelInfo:
        inputs = {i["name"]: i["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
                  for i in config.get("input", [])}
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        return cls(config["name"], inputs, params, int(config.get("max_batch_size", 0)) > 0)


@dataclass
class Piece:
    """One response of the model: one sequence's new text and tokens, and its counters so far."""

    index: int  # sequence_index (0 for a single sequence)
    text: str
    token_ids: list[int]
    num_tokens: int
    nfe: int
    tpf: float
    finish_reason: str = ""  # set on the sequence's last response
    stats: dict[str, Any] | None = None  # likewise
    reasoning: str = ""  # reasoning_output (separate_reasoning=true)
    logprobs: list[dict[str, Any]] | None = None
    prompt_tokens: int | None = None  # num_input_tokens (return_num_input_tokens=true)
    prompt_logprobs: list[dict[str, Any]] | None = None  # the sequence's first response, with prompt_logprobs


WIRE = {"INT32": "<i4", "INT64": "<i8", "UINT64": "<u8", "FP32": "<f4", "BOOL": "?"}


def _decode(datatype: str, raw: bytes) -> Any:
    """One output tensor's raw bytes as a list (BYTES: length-prefixed elements)."""
    if datatype == "BYTES":
        items, i = [], 0
        while i < len(raw):
            n = int.from_bytes(raw[i:i + 4], "little")
            items.append(raw[i + 4:i + 4 + n])
            i += 4 + n
        return items
    return np.frombuffer(raw, dtype=WIRE[datatype]).tolist()


def outputs(result: Any) -> dict[str, list]:
    """Every output of a tritonclient InferResult, decoded straight from the response message (one pass,
    instead of a search through the outputs per name)."""
    response = result.get_response()
    if len(response.raw_output_contents) == len(response.outputs):
        return {o.name: _decode(o.datatype, raw) for o, raw in zip(response.outputs, response.raw_output_contents)}
    return {o.name: result.as_numpy(o.name).reshape(-1).tolist() for o in response.outputs}


def first_string(values: list | None) -> str:
    if not values:
        return ""
    v = values[0]
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def piece_from(result: Any) -> Piece:
    """A Piece from a tritonclient InferResult."""
    out = outputs(result)
    stats, logprobs = first_string(out.get("stats")), first_string(out.get("logprobs"))
    prompt = first_string(out.get("prompt_logprobs"))
    return Piece(
        index=int(out["sequence_index"][0]) if out.get("sequence_index") else 0,
        text=first_string(out.get("text_output")),
        token_ids=[int(t) for t in out.get("output_ids", [])],
        num_tokens=int(out["num_tokens"][0]) if out.get("num_tokens") else 0,
        nfe=int(out["nfe"][0]) if out.get("nfe") else 0,
        tpf=float(out["tpf"][0]) if out.get("tpf") else 0.0,
        finish_reason=first_string(out.get("finish_reason")),
        stats=json.loads(stats) if stats else None,
        reasoning=first_string(out.get("reasoning_output")),
        logprobs=json.loads(logprobs) if logprobs else None,
        prompt_tokens=int(out["num_input_tokens"][0]) if out.get("num_input_tokens") else None,
        prompt_logprobs=json.loads(prompt) if prompt else None,
    )


@dataclass
class TritonBridge:
    """One gRPC channel to tritonserver, shared by every request of the front end's event loop."""

    url: str  # host:port of Triton's gRPC endpoint
    model: str = MODEL
    _client: Any = None
    _info: ModelInfo | None = None
    _tokenizer_info: ModelInfo | None = None
    _draining: set[asyncio.Task] = field(default_factory=set)

    def client(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        for task in list(self._draining):
            task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self) -> bool:
        try:
            return bool(await self.client().is_model_ready(self.model, client_timeout=5))
        except Exception:  # noqa: BLE001 - unreachable, refused, timed out: all mean not ready
            return False

    async def info(self) -> ModelInfo:
        """The served model's inputs and limits (read once, when first needed)."""
        if self._info is None:
            try:
                config = await self.client().get_model_config(self.model, as_json=True, client_timeout=10)
            except Exception as e:  # noqa: BLE001
                raise TritonUnavailable(f"tritonserver at {self.url} is not ready to serve model {self.model!r} "
                                        f"({_reason(e)}): start it with `nld-trt serve REPO` or wait for it") from None
            self._info = ModelInfo.from_config(config["config"])
        return self._info

    async def tokenizer(self, fields: dict[str, Any], wanted: list[str]) -> dict[str, list]:
        """One unary request to the repository's tokenizer model: its outputs `wanted`, decoded.

        Raises NoTokenizer (a repository without one), ModelError (it refused the request), TritonUnavailable."""
        name = (await self.info()).parameters.get("tokenizer_model")
        if not name:
            raise NoTokenizer(f"the model {self.model!r} of this deployment names no tokenizer model: re-package it "
                              "with a newer nld-trt (nld-trt package) for /tokenize, /detokenize and echo of token ids")
        if self._tokenizer_info is None:
            try:
                config = await self.client().get_model_config(name, as_json=True, client_timeout=10)
            except Exception as e:  # noqa: BLE001
                raise TritonUnavailable(f"tritonserver at {self.url} does not serve the tokenizer model {name!r} "
                                        f"({_reason(e)})") from None
            self._tokenizer_info = ModelInfo.from_config(config["config"])
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        try:
            result = await self.client().infer(name, self.tensors(self._tokenizer_info, fields),
                                               outputs=[grpcclient.InferRequestedOutput(o) for o in wanted],
                                               client_timeout=60)
        except InferenceServerException as e:
            message = e.message() or str(e)
            if "unavailable" in message.lower() or "connect" in message.lower():
                raise TritonUnavailable(f"tritonserver at {self.url} failed the request: {message}") from None
            raise ModelError(message) from None
        return outputs(result)

    def tensors(self, info: ModelInfo, fields: dict[str, Any]) -> list[Any]:
        """One InferInput per field, typed as the model's config declares; lists become [1, N] tensors."""
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, value in fields.items():
            if value is None:
                continue
            wire = info.inputs[name]  # callers only send inputs the model has (schema.check_supported)
            values = value if isinstance(value, list) else [value]
            if wire == "BYTES":
                values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
            array = np.array([values] if info.batched else values, dtype=NUMPY[wire])
            if isinstance(value, list) and not info.batched:
                array = array.reshape(-1)
            tensor = grpcclient.InferInput(name, list(array.shape), wire)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    async def generate(self, fields: dict[str, Any], sequences: int = 1) -> AsyncIterator[Piece]:
        """Stream the model's responses to one request of `sequences` sequences until each has finished.

        Raises ModelError with the model's message, TritonUnavailable when tritonserver is gone. Leaving
        the iteration early (or cancelling the task) cancels the request on the server."""
        info = await self.info()
        inputs = self.tensors(info, {"stream": True, **fields})

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs}

        try:
            call = self.client().stream_infer(requests())
        except Exception as e:  # noqa: BLE001
            raise TritonUnavailable(f"cannot reach tritonserver at {self.url}: {_reason(e)}") from None
        finished: set[int] = set()
        try:
            while len(finished) < sequences:
                try:
                    result, error = await call.__anext__()
                except StopAsyncIteration:
                    raise ModelError("the model ended the request without a final response") from None
                except Exception as e:  # noqa: BLE001 - grpc.aio.AioRpcError: the connection or server failed
                    raise TritonUnavailable(f"tritonserver at {self.url} failed the request: {_reason(e)}") from None
                if error is not None:
                    finished = set(range(sequences))  # an error response is final: nothing left to cancel
                    raise ModelError(error.message())
                piece = piece_from(result)
                if piece.finish_reason:
                    finished.add(piece.index)
                yield piece
        finally:
            if len(finished) < sequences:
                call.cancel()  # the caller left: the server cancels the request and frees its KV slot
            else:
                task = asyncio.get_running_loop().create_task(self._drain(call))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)

    @staticmethod
    async def _drain(call: Any) -> None:
        """Read a finished request's stream to its end (the server closes it after the final flag)."""
        try:
            async with asyncio.timeout(DRAIN_S):
                async for _ in call:
                    pass
        except TimeoutError:
            call.cancel()
        except Exception:  # noqa: BLE001 - the request is complete; a late stream error changes nothing
            pass


def _reason(error: BaseException) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else None
    message = getattr(error, "message", None)
    text = text or (message() if callable(message) else None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
