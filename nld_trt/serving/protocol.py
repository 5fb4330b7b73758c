"""The wire protocol of the `nld` and `nld_sync` Triton models: tensor names, types and request parsing.

Names follow TensorRT-LLM's Triton ensemble where they overlap (`text_input`, `max_tokens`, `stream`,
`temperature`, `end_id`, `random_seed`, `text_output`, `output_ids`), so its clients and benchmarks work
unchanged; NLD adds `mode`, `block_length`, `threshold`, `seed`, `chat` and `messages`. Any input may also
come as a request parameter (inputs win). Parsing is pure Python over already-extracted values, so it is
tested without a server; validation is `GenerationParams.validate`, plus the deployment's limits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..decoding import GenerationParams
from ..errors import GenerationError

if TYPE_CHECKING:
    from ..runtime import NLD


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # the Triton config type
    dims: str = "[ 1 ]"
    doc: str = ""

    @property
    def wire_type(self) -> str:
        """The datatype name clients use (tritonclient InferInput)."""
        return {"TYPE_STRING": "BYTES"}.get(self.dtype, self.dtype.removeprefix("TYPE_"))


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", doc="the prompt, UTF-8; with chat=true (default) one user turn"),
    TensorSpec("messages", "TYPE_STRING", doc="instead of text_input: a JSON list of {role, content}"),
    TensorSpec("max_tokens", "TYPE_INT32", doc="tokens to generate at most"),
    TensorSpec("stream", "TYPE_BOOL", doc="nld only: one response per decoding step (default false)"),
    TensorSpec("temperature", "TYPE_FP32", doc="0 is greedy"),
    TensorSpec("end_id", "TYPE_INT32", doc="stop token (default: the checkpoint's EOS)"),
    TensorSpec("random_seed", "TYPE_UINT64", doc="TensorRT-LLM's name for seed"),
    TensorSpec("mode", "TYPE_STRING", doc="ar | dlm | linear_spec"),
    TensorSpec("block_length", "TYPE_INT32", doc="dlm / linear_spec block length"),
    TensorSpec("threshold", "TYPE_FP32", doc="confidence threshold in [0, 1]"),
    TensorSpec("seed", "TYPE_INT64", doc="sampling seed"),
    TensorSpec("chat", "TYPE_BOOL", doc="apply the chat template to text_input (default true)"),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", "[ -1 ]", "the new text (streaming: this step's delta)"),
    TensorSpec("output_ids", "TYPE_INT32", "[ -1 ]", "the new token ids (streaming: this step's)"),
    TensorSpec("num_tokens", "TYPE_INT32", doc="tokens generated so far"),
    TensorSpec("nfe", "TYPE_INT32", doc="forward passes so far, the prefill counted as one"),
    TensorSpec("tpf", "TYPE_FP32", doc="tokens per forward pass so far"),
    TensorSpec("finish_reason", "TYPE_STRING", doc="final response only: eos | length"),
    TensorSpec("stats", "TYPE_STRING", doc="final response only: JSON stats, incl. KV-slot occupancy"),
)

INPUT_TYPES = {t.name: t for t in INPUTS}
# request-parameter aliases; the TensorRT-LLM name wins over ours where both come
ALIASES = {"random_seed": "seed"}


@dataclass(frozen=True)
class Limits:
    """What one deployment accepts, from the model's config.pbtxt parameters."""

    max_tokens_cap: int
    default_max_tokens: int
    streaming: bool  # the decoupled model streams; the sync one answers once


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: GenerationParams
    stream: bool


def scalar(name: str, value: Any) -> Any:
    """A plain Python value from one input tensor (numpy array) or a request parameter."""
    if hasattr(value, "shape"):  # a numpy array: exactly one element per request
        if value.size != 1:
            raise GenerationError(f"{name} must hold one value per request, got shape {list(value.shape)}: "
                                  "send one prompt per request")
        value = value.reshape(-1)[0]
        if getattr(value, "dtype", None) is not None and value.dtype.kind == "f" and value.dtype.itemsize < 8:
            return float(str(value))  # FP32 0.9 means 0.9, not 0.89999997615814
        value = value.item() if hasattr(value, "item") and not isinstance(value, bytes) else value
    return value


def text(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenerationError(
                f"{name} is not valid UTF-8 (byte 0x{value[e.start]:02x} at position {e.start}): send UTF-8 text"
            ) from None
    if isinstance(value, str):
        return value
    raise GenerationError(f"{name} must be a string, got {type(value).__name__}")


def gather(inputs: dict[str, Any], parameters: dict[str, Any] | str | None) -> dict[str, Any]:
    """One dict of request fields: the request parameters, overridden by the input tensors present."""
    if isinstance(parameters, str):
        parameters = json.loads(parameters) if parameters else {}
    fields = {ALIASES.get(k, k): v for k, v in (parameters or {}).items() if ALIASES.get(k, k) in INPUT_TYPES}
    for name, value in inputs.items():
        if value is not None:
            fields[ALIASES.get(name, name)] = scalar(name, value)
    return fields


def _integer(name: str, v: Any) -> Any:
    """Integral floats from JSON (`"max_tokens": 8.0`) become ints; anything else is left to validate."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


def _flag(name: str, v: Any, default: bool) -> bool:
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, (bytes, str)) and text(name, v).lower() in ("true", "false", "1", "0"):
        return text(name, v).lower() in ("true", "1")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise GenerationError(f"{name} must be true or false, got {v!r}")


def prompt_ids(nld: NLD, fields: dict[str, Any]) -> list[int]:
    """The prompt's token ids: `messages` through the chat template, or `text_input` (templated unless
    chat=false)."""
    chat = _flag("chat", fields.get("chat"), True)
    if fields.get("messages") is not None:
        try:
            messages = json.loads(text("messages", fields["messages"]))
        except json.JSONDecodeError as e:
            raise GenerationError(f"messages is not valid JSON ({e})") from None
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise GenerationError('messages must be a non-empty JSON list of {"role": ..., "content": ...}')
        ids = nld.tokenizer.encode_chat(messages)
    elif fields.get("text_input") is not None:
        prompt = text("text_input", fields["text_input"])
        if not prompt:
            raise GenerationError("text_input is empty: send some text")
        ids = nld.encode(prompt, chat=chat)
    else:
        raise GenerationError("missing text_input: send the prompt as the text_input tensor (or messages)")
    if not ids:
        raise GenerationError("the prompt encodes to no tokens")
    return ids


def prepare(nld: NLD, fields: dict[str, Any], limits: Limits) -> Prepared:
    """Validate one request against the model and the deployment; GenerationError names what to fix."""
    mode = fields.get("mode", "ar")
    mode = text("mode", mode) if isinstance(mode, (bytes, str)) else mode
    end_id = _integer("end_id", fields.get("end_id"))
    try:
        params = GenerationParams(
            mode=mode,
            max_new_tokens=_integer("max_tokens", fields.get("max_tokens", limits.default_max_tokens)),
            block_length=_integer("block_length", fields.get("block_length")),
            threshold=fields.get("threshold"),
            temperature=fields.get("temperature", 0.0),
            seed=_integer("seed", fields.get("seed", 0)),
            eos_token_ids=None if end_id is None else (end_id,),
        ).resolved(nld.config)
    except TypeError as e:
        raise GenerationError(f"bad request field: {e}") from None
    try:
        params.validate(nld.config, nld.executor.max_chunk)
    except GenerationError as e:  # speak the wire names
        raise GenerationError(str(e).replace("max_new_tokens", "max_tokens").replace("eos token id", "end_id")) from None
    if params.max_new_tokens > limits.max_tokens_cap:
        raise GenerationError(
            f"max_tokens {params.max_new_tokens} is over this deployment's cap of {limits.max_tokens_cap}: ask for fewer"
        )
    stream = _flag("stream", fields.get("stream"), False)
    if stream and not limits.streaming:
        raise GenerationError("stream=true needs the decoupled model `nld` (gRPC stream or HTTP generate_stream)")
    ids = prompt_ids(nld, fields)
    nld.check_fits(len(ids), params, "this deployment's limit; shorten the prompt or lower max_tokens", "max_tokens")
    return Prepared(ids, params, stream)
