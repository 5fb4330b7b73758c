"""The one request mapping: a generation request, described neutrally, becomes the Triton model's inputs.

Two front ends put requests on an nld-trt deployment: the OpenAI front end (schema.py: an OpenAI HTTP body) and
the Dynamo worker (nld_trt/serving/dynamo/request.py: the request Dynamo's frontend preprocessed). Both describe
what was asked for with the same three pieces, and this module alone turns them into model inputs, checks them
against the deployment's limits and the served model's inputs, and names the field in every refusal:

- `Generation`: the sampling and decoding fields (OpenAI's and vLLM's names, NLD's own beside them), validated
  strictly (pydantic; `"5"` is not an integer) with the same ranges wherever the request came from;
- a prompt: `ChatPrompt` (messages through the chat template), `TextPrompt` (raw text) or `TokenPrompt` (ids);
- `Outputs`: what comes back besides tokens (log-probabilities, prompt log-probabilities).

`NOT_IMPLEMENTED` lists the OpenAI fields nld-trt does not implement: accepted only at their default value,
refused with the reason otherwise, by both front ends (`refuse_not_implemented`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .triton import ModelInfo

MAX_N = 64  # sequences per request (also bounded by the deployment's KV slots)
MAX_STOP = 16
MAX_SEED = 2**62  # seeds seed+i of n sequences stay inside UINT64 and INT64 alike
MAX_TOP_LOGPROBS = 20
MAX_INT32 = 2**31 - 1  # the model's integer inputs are INT32
MAX_BAD_WORDS = 256


class RequestError(Exception):
    """A request a front end refuses; becomes an OpenAI error body with `status`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Fields of the OpenAI API that nld-trt does not implement: accepted only with one of these (default) values.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "function calling is not supported"),
    "tool_choice": ((None, "none", "auto"), "function calling is not supported"),
    "parallel_tool_calls": ((None, True), "function calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none", "auto"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text output is supported (no JSON mode or json_schema)"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "frequency_penalty": ((None, 0), "penalties are not supported"),
    "presence_penalty": ((None, 0), "penalties are not supported"),
    "repetition_penalty": ((None, 1), "penalties are not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "store": ((None, False), "stored completions are not supported"),
    "metadata": ((None, {}), "metadata is only used with store, which is not supported"),
    "service_tier": ((None, "auto", "default"), "service tiers are not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "use chat_template_kwargs (e.g. {\"enable_thinking\": true}) and max_thinking_tokens"),
    "web_search_options": ((None,), "web search is not supported"),
    "ignore_eos": ((None, False), "ignore_eos is not supported"),
    "include_stop_str_in_output": ((None, False), "stop strings are never included in the output"),
    "skip_special_tokens": ((None, True), "special tokens are always skipped"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Generation(Strict):
    """What to generate and how: the fields every front end shares, NLD's own included."""

    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    # NLD's own (OpenAI: extra body keys; Dynamo: nvext annotations)
    mode: Literal["ar", "dlm", "linear_spec", "auto"] | None = None
    block_length: int | None = Field(None, ge=1, le=MAX_INT32)
    threshold: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    max_thinking_tokens: int | None = Field(None, ge=0, le=MAX_INT32)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] | None = Field(None, max_length=MAX_STOP)
    min_tokens: int | None = Field(None, ge=0, le=MAX_INT32)  # vLLM's name too: no EOS or stop before this many tokens
    steps_per_block: int | None = Field(None, ge=1, le=MAX_INT32)
    acceptance: Literal["speculative", "official"] | None = None
    draft: Literal["repeat", "once"] | None = None
    lora: bool | None = None
    allow_lossy: bool | None = None  # mode auto may also choose dlm
    # vLLM's: words no output may complete (each as it is and with a leading space), and prompt log-probabilities
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError("must be a string or a list of strings")
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(v)}")
        if isinstance(v, list) and not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        return v

    def stop_words(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def limit(self) -> int | None:
        """The most tokens to generate (the request's max_tokens, or its successor's)."""
        return self.max_tokens

    @property
    def limit_param(self) -> str:
        """The field `limit` came from, for error messages."""
        return "max_tokens"


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered by the model's chat template: [{role, content}] as the model's `messages` take it."""

    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class TextPrompt:
    """Raw text, tokenized as it is (no chat template)."""

    text: str


@dataclass(frozen=True)
class TokenPrompt:
    """Token ids, never re-tokenized."""

    ids: list[int]


Prompt = ChatPrompt | TextPrompt | TokenPrompt


@dataclass(frozen=True)
class Outputs:
    """What comes back besides the tokens, and the request field each was asked with (for refusals)."""

    logprobs: bool = False
    top_logprobs: int = 0
    logprobs_param: str = "logprobs"
    prompt_logprobs: int | None = None  # top N alternatives per prompt token
    prompt_param: str = "prompt_logprobs"


# validation -------------------------------------------------------------------------------------------
def refuse_not_implemented(data: dict[str, Any]) -> None:
    """Take the NOT_IMPLEMENTED fields out of `data`, refusing any not at its default."""
    for name, (defaults, why) in NOT_IMPLEMENTED.items():
        if name in data:
            value = data.pop(name)
            if not any(_same(value, d) for d in defaults):
                raise RequestError(f"{name}={json.dumps(value)[:80]} is not supported by nld-trt: {why}", param=name)


def validate(cls: type[Strict], data: dict[str, Any]) -> Any:
    """`cls` validated from `data`, or RequestError naming the first bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise request_error(e) from None


def _same(value: Any, default: Any) -> bool:
    """value is the default (False is not 0 here, and 1.0 is 1)."""
    if isinstance(value, bool) or isinstance(default, bool) or value is None or default is None:
        return value is default
    return type(value) in (int, float) and type(default) in (int, float) and value == default or (
        type(value) is type(default) and value == default)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def request_error(error: ValidationError) -> RequestError:
    """The first pydantic error as a message that names the field (OpenAI's `param`)."""
    first = error.errors()[0]
    # union members add their type to the location ('stop', 'list[str]', 0): keep field names and indices
    loc = [str(x) for x in first["loc"] if isinstance(x, int) or str(x).isidentifier() and str(x) not in TYPE_TAGS]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return RequestError(f"unknown field {param!r}: nld-trt does not take it (the README's OpenAI section lists "
                            "the fields it does)", param=param)
    if first["type"] == "missing":
        return RequestError(f"{param} is required", param=param)
    got = first.get("input")
    scalar = got is None or isinstance(got, (str, int, float, bool))
    shown = f", got {json.dumps(got)[:80]}" if scalar and first["type"] != "value_error" else ""
    return RequestError(f"{param}: {msg}{shown}" if param else msg, param=param)


# the model's inputs -------------------------------------------------------------------------------
@dataclass
class TritonRequest:
    """What to send for one prompt: the model's inputs and how many sequences come back."""

    fields: dict[str, Any]
    sequences: int


def need(info: ModelInfo, input_name: str, param: str, used: bool) -> bool:
    """True if the field is used and the served model can take it; RequestError if used and it cannot."""
    if not used:
        return False
    if not info.has(input_name):
        raise RequestError(
            f"{param} needs the served model's `{input_name}` input, which the model `{info.name}` of this deployment "
            "does not have: re-package it with a newer nld-trt (nld-trt package)", param=param)
    return True


def check_limits(req: Generation, info: ModelInfo) -> None:
    cap = info.limit("max_tokens_cap", 0)
    limit = req.limit
    if cap and limit is not None and limit > cap:
        name = req.limit_param
        raise RequestError(f"{name} {limit} is over this deployment's cap of {cap}: ask for fewer", param=name)
    block = info.limit("max_block_length", 0)
    if block and req.block_length is not None and req.block_length > block:
        raise RequestError(f"block_length {req.block_length} is over this deployment's maximum of {block}",
                           param="block_length")
    slots = info.limit("max_batch", 0)
    if slots and req.n > slots:
        raise RequestError(f"n {req.n} is more than this deployment's {slots} KV-cache slots: ask for fewer "
                           "sequences", param="n")


def common_fields(req: Generation, info: ModelInfo) -> dict[str, Any]:
    """The inputs every prompt of the request shares."""
    check_limits(req, info)
    fields: dict[str, Any] = {
        "max_tokens": req.limit, "temperature": req.temperature, "mode": req.mode,
        "block_length": req.block_length, "threshold": req.threshold, "seed": req.seed,
    }
    if fields["seed"] is None and (req.temperature or 0) > 0:
        fields["seed"] = secrets.randbelow(MAX_SEED - MAX_N)  # OpenAI semantics: no seed, a fresh sample
    if need(info, "top_p", "top_p", req.top_p not in (None, 1, 1.0)):
        fields["top_p"] = req.top_p
    if need(info, "top_k", "top_k", req.top_k not in (None, 0, -1)):
        fields["top_k"] = req.top_k
    if need(info, "min_p", "min_p", req.min_p not in (None, 0)):
        fields["min_p"] = req.min_p
    if need(info, "stop_words", "stop", bool(req.stop_words())):
        fields["stop_words"] = req.stop_words()
    if need(info, "stop_token_ids", "stop_token_ids", bool(req.stop_token_ids)):
        fields["stop_token_ids"] = req.stop_token_ids
    if need(info, "max_thinking_tokens", "max_thinking_tokens", req.max_thinking_tokens is not None):
        fields["max_thinking_tokens"] = req.max_thinking_tokens
    if need(info, "num_return_sequences", "n", req.n > 1):
        fields["num_return_sequences"] = req.n
    for name in ("min_tokens", "steps_per_block", "acceptance", "draft", "lora", "allow_lossy"):  # NLD's own, as they are
        if need(info, name, name, getattr(req, name) is not None):
            fields[name] = getattr(req, name)
    if need(info, "bad_words", "bad_words", bool(req.bad_words)):
        fields["bad_words"] = vllm_bad_words(req.bad_words)
    if info.has("return_num_input_tokens"):  # prompt_tokens on every response (usage while streaming)
        fields["return_num_input_tokens"] = True
    return {k: v for k, v in fields.items() if v is not None}


def vllm_bad_words(words: list[str]) -> list[str]:
    """vLLM's rule: each word is banned as it is (left-stripped) and with a leading space, so that it is banned at
    the start of the text and after a space alike (the model encodes each string as it is, TensorRT-LLM's rule)."""
    out: list[str] = []
    for w in words:
        for variant in (w.lstrip(), " " + w.lstrip()):
            if variant.strip() and variant not in out:
                out.append(variant)
    return out


def prompt_fields(prompt: Prompt, info: ModelInfo, param: str) -> dict[str, Any]:
    """The inputs that carry the prompt (`param`: the request field it came in)."""
    if isinstance(prompt, ChatPrompt):
        fields: dict[str, Any] = {"messages": json.dumps(prompt.messages, ensure_ascii=False)}
        if need(info, "chat_template_kwargs", "chat_template_kwargs", bool(prompt.template_kwargs)):
            fields["chat_template_kwargs"] = json.dumps(prompt.template_kwargs, ensure_ascii=False)
        if info.has("separate_reasoning"):
            fields["separate_reasoning"] = True
        return fields
    if isinstance(prompt, TextPrompt):
        return {"text_input": prompt.text, "chat": False}
    need(info, "input_ids", param, True)
    return {"input_ids": list(prompt.ids)}


def output_fields(outputs: Outputs, info: ModelInfo) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if need(info, "return_log_probs", outputs.logprobs_param, outputs.logprobs):
        fields["return_log_probs"] = True
        if outputs.top_logprobs:
            need(info, "top_logprobs", "top_logprobs", True)
            fields["top_logprobs"] = outputs.top_logprobs
    if need(info, "prompt_logprobs", outputs.prompt_param, outputs.prompt_logprobs is not None):
        fields["prompt_logprobs"] = outputs.prompt_logprobs
    return fields


def triton_requests(req: Generation, prompts: list[Prompt], outputs: Outputs, info: ModelInfo,
                    prompt_param: str = "prompt") -> list[TritonRequest]:
    """One model request per prompt, each with the request's n sequences."""
    shared = {**common_fields(req, info), **output_fields(outputs, info)}
    return [TritonRequest({**shared, **prompt_fields(p, info, prompt_param)}, req.n) for p in prompts]
