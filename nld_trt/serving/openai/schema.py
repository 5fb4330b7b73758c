"""OpenAI request validation and the model inputs each request becomes.

Every field of `/v1/chat/completions` and `/v1/completions` is checked here (pydantic, strict: `"5"` is not
an integer) before anything reaches Triton, so a bad request gets an OpenAI-shaped 400 whose message and
`param` name the field. Fields nld-trt does not implement (tools, response_format json_schema, penalties,
logit_bias, echo, ...) are refused unless they carry their default value; unknown fields are refused too:
nothing is silently ignored except `user` and its successors. NLD's own fields (`mode`, `block_length`,
`threshold`, `top_k`, `min_p`, `max_thinking_tokens`, `chat_template_kwargs`, `stop_token_ids`) come as
extra body keys, which is what the OpenAI SDK's `extra_body` sends; so do `min_tokens`, `steps_per_block`,
`acceptance`, `draft`, `lora` and `allow_lossy`, the model's own names, and vLLM's `bad_words` and
`prompt_logprobs`.

`common_fields`, `chat_request` and `completion_requests` are the one place an OpenAI request becomes the
served model's inputs (the Dynamo worker shares them), refusing what that model's config cannot take (an
older repository without `stop_words`, say) and what is over the deployment's limits.

Images: `messages[].content` may hold OpenAI's `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`
parts in user messages. `image_parts` lists them, `check_images` refuses what the served model cannot take (a
text model, more images than the deployment allows, a data URL over its byte cap) naming the part
(`messages[0].content[1]`, as the model names it too); allowed http(s) URLs are fetched (media.py) before
`chat_request`, which sends only data URLs, inline, in the content parts of the `messages` input.
`chat_request_with_images` does the three in order: what a front end (the FastAPI app, the Dynamo worker) calls.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .media import MediaError, MediaOptions, inline
from .triton import ModelInfo

MAX_N = 64  # sequences per request (also bounded by the deployment's KV slots)
MAX_PROMPTS = 64  # prompts per /v1/completions request
MAX_STOP = 16
MAX_SEED = 2**62  # seeds seed+i of n sequences stay inside UINT64 and INT64 alike
MAX_TOP_LOGPROBS = 20
MAX_INT32 = 2**31 - 1  # the model's integer inputs are INT32
MAX_BAD_WORDS = 256
PROMPT_FORMS = "must be a string, a list of strings, a list of token ids or a list of token-id lists"


class RequestError(Exception):
    """A request the front end refuses; becomes an OpenAI error body with `status`."""

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
IGNORED = ("user", "safety_identifier", "prompt_cache_key")  # end-user identifiers: accepted, not used


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name: usage so far on every chunk (the web page's live stats)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


DETAILS = ("auto", "low", "high")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model sees every image at its own resolution


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _plain_url(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v  # {"image_url": "data:..."}: some clients send the URL alone


def check_parts(messages: Any) -> None:
    """Content parts checked before the model validation, so that a bad one is named as the model names it
    (`messages[0].content[1]`): text or image_url only, images in user messages only (OpenAI's rule), an image part
    as OpenAI shapes it."""
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            param = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise RequestError(f'{param}: a content part must be an object, {{"type": "text", ...}} or '
                                   f'{{"type": "image_url", ...}}, got {json.dumps(part)[:40]}', param=param)
            kind = part.get("type")
            if kind == "text":
                continue
            if kind != "image_url":
                raise RequestError(f"{param}: content parts of type {kind!r} are not supported: send text and "
                                   "image_url parts", param=param)
            if m.get("role") != "user":
                raise RequestError(f"{param}: an image part in a {m.get('role')} message: images go in user messages "
                                   "only", param=param)
            url = part.get("image_url")
            extra = set(part) - {"type", "image_url"}
            if isinstance(url, dict):
                extra |= {f"image_url.{k}" for k in set(url) - {"url", "detail"}}
                detail, url = url.get("detail"), url.get("url")
                if detail is not None and detail not in DETAILS:
                    raise RequestError(f"{param}: image_url.detail must be auto, low or high, got {json.dumps(detail)[:40]}",
                                       param=param)
            if extra:
                raise RequestError(f"{param}: unknown field {sorted(extra)[0]!r} in an image_url part", param=param)
            if not isinstance(url, str) or not url:
                raise RequestError(f'{param}: an image_url part needs {{"image_url": {{"url": "data:image/png;base64,..."}}}}',
                                   param=param)


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> Any:
        if v in ("tool", "function"):
            raise ValueError(f"role {v!r} (tool results) is not supported: nld-trt does no function calling")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)] if isinstance(self.content, list) else []

    def model_content(self) -> str | list[dict[str, Any]]:
        """What the model's `messages` input carries: the text, or with images every part in order (so the
        model's part indices are the request's)."""
        if not self.images:
            return self.text()
        return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                {"type": "image_url", "image_url": {"url": p.image_url.url}} for p in self.content]


class _Request(_Strict):
    """The fields both endpoints share, NLD's own included."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    # NLD's own (extra_body)
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

    @model_validator(mode="after")
    def _stream_options(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", param="stream_options")
        return self

    def stop_words(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _parts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_parts(data.get("messages"))
        return data

    @model_validator(mode="after")
    def _checks(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise RequestError(f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                               "disagree: send one of them", param="max_completion_tokens")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT32)  # 0: score the prompt only (echo or prompt_logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    echo: bool = False  # the answer starts with the prompt (and its log-probabilities with logprobs)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str):
            if not v:
                raise ValueError("empty: send some text")
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(PROMPT_FORMS)
        if len(v) > MAX_PROMPTS and not ids(v):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        if all(isinstance(x, str) for x in v):
            if not all(v):
                raise ValueError(f"prompt {[bool(x) for x in v].index(False)} is empty: send some text")
            return v
        if ids(v) or all(ids(x) for x in v):
            flat = v if ids(v) else [t for x in v for t in x]
            if any(not 0 <= t <= MAX_INT32 for t in flat):
                raise ValueError("token ids must be in [0, 2^31)")
            return v
        raise ValueError(PROMPT_FORMS + " (token-id lists must be non-empty lists of integers)")

    chat_template_kwargs: None = None  # refused with a reason below: completions send the prompt raw

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _no_template(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("applies to /v1/chat/completions only: /v1/completions sends the prompt raw, without "
                             "the chat template")
        return v

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of {self.best_of} differs from n {self.n}: nld-trt returns every sequence it "
                               "generates, so best_of can only equal n", param="best_of")
        if self.max_tokens == 0 and not (self.echo or self.prompt_logprobs is not None):
            raise RequestError("max_tokens 0 generates nothing: it scores the prompt, with echo=true (and logprobs) "
                               "or prompt_logprobs", param="max_tokens")
        return self

    @property
    def prompt_scores(self) -> int | None:
        """The prompt log-probabilities to ask the model for (top N): echo with logprobs, prompt_logprobs, or
        max_tokens 0 (the model needs them to accept a request that generates nothing)."""
        wanted = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs) if n is not None]
        if wanted:
            return max(wanted)
        return 0 if self.max_tokens == 0 else None

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [p]
        return list(p)


def parse(cls: type[_Request], body: bytes) -> _Request:
    """The validated request, or RequestError naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    for name in IGNORED:
        if name in data and not isinstance(data[name], (str, type(None))):
            raise RequestError(f"{name} must be a string", param=name)
        data.pop(name, None)
    for name, (defaults, why) in NOT_IMPLEMENTED.items():
        if name in data:
            value = data.pop(name)
            if not any(_same(value, d) for d in defaults):
                raise RequestError(f"{name}={json.dumps(value)[:80]} is not supported by nld-trt: {why}", param=name)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _request_error(e) from None


def _same(value: Any, default: Any) -> bool:
    """value is the default (False is not 0 here, and 1.0 is 1)."""
    if isinstance(value, bool) or isinstance(default, bool) or value is None or default is None:
        return value is default
    return type(value) in (int, float) and type(default) in (int, float) and value == default or (
        type(value) is type(default) and value == default)


def _request_error(error: ValidationError) -> RequestError:
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


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


# the model's inputs -------------------------------------------------------------------------------
@dataclass
class TritonRequest:
    """What to send for one prompt: the model's inputs and how many sequences come back."""

    fields: dict[str, Any]
    sequences: int


def _need(info: ModelInfo, input_name: str, param: str, used: bool) -> bool:
    """True if the field is used and the served model can take it; RequestError if used and it cannot."""
    if not used:
        return False
    if not info.has(input_name):
        raise RequestError(
            f"{param} needs the served model's `{input_name}` input, which the model `{info.name}` of this deployment "
            "does not have: re-package it with a newer nld-trt (nld-trt package)", param=param)
    return True


def check_limits(req: _Request, info: ModelInfo) -> None:
    cap = info.limit("max_tokens_cap", 0)
    limit = req.limit
    if cap and limit is not None and limit > cap:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        raise RequestError(f"{name} {limit} is over this deployment's cap of {cap}: ask for fewer", param=name)
    block = info.limit("max_block_length", 0)
    if block and req.block_length is not None and req.block_length > block:
        raise RequestError(f"block_length {req.block_length} is over this deployment's maximum of {block}",
                           param="block_length")
    slots = info.limit("max_batch", 0)
    if slots and req.n > slots:
        raise RequestError(f"n {req.n} is more than this deployment's {slots} KV-cache slots: ask for fewer "
                           "sequences", param="n")


def common_fields(req: _Request, info: ModelInfo) -> dict[str, Any]:
    """The inputs every prompt of the request shares."""
    check_limits(req, info)
    fields: dict[str, Any] = {
        "max_tokens": req.limit, "temperature": req.temperature, "mode": req.mode,
        "block_length": req.block_length, "threshold": req.threshold, "seed": req.seed,
    }
    if fields["seed"] is None and (req.temperature or 0) > 0:
        fields["seed"] = secrets.randbelow(MAX_SEED - MAX_N)  # OpenAI semantics: no seed, a fresh sample
    if _need(info, "top_p", "top_p", req.top_p not in (None, 1, 1.0)):
        fields["top_p"] = req.top_p
    if _need(info, "top_k", "top_k", req.top_k not in (None, 0, -1)):
        fields["top_k"] = req.top_k
    if _need(info, "min_p", "min_p", req.min_p not in (None, 0)):
        fields["min_p"] = req.min_p
    if _need(info, "stop_words", "stop", bool(req.stop_words())):
        fields["stop_words"] = req.stop_words()
    if _need(info, "stop_token_ids", "stop_token_ids", bool(req.stop_token_ids)):
        fields["stop_token_ids"] = req.stop_token_ids
    if _need(info, "max_thinking_tokens", "max_thinking_tokens", req.max_thinking_tokens is not None):
        fields["max_thinking_tokens"] = req.max_thinking_tokens
    if _need(info, "num_return_sequences", "n", req.n > 1):
        fields["num_return_sequences"] = req.n
    for name in ("min_tokens", "steps_per_block", "acceptance", "draft", "lora", "allow_lossy"):  # NLD's own, as they are
        if _need(info, name, name, getattr(req, name) is not None):
            fields[name] = getattr(req, name)
    if _need(info, "bad_words", "bad_words", bool(req.bad_words)):
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


def _prompt_scores(info: ModelInfo, fields: dict[str, Any], param: str, top: int | None) -> None:
    if _need(info, "prompt_logprobs", param, top is not None):
        fields["prompt_logprobs"] = top


def _logprobs(info: ModelInfo, fields: dict[str, Any], param: str, wanted: bool, top: int) -> None:
    if _need(info, "return_log_probs", param, wanted):
        fields["return_log_probs"] = True
        if top:
            _need(info, "top_logprobs", "top_logprobs", True)
            fields["top_logprobs"] = top


def image_parts(req: ChatRequest) -> list[tuple[str, ImagePart]]:
    """(param, part) of every image part of a chat request, in order."""
    return [(f"messages[{i}].content[{j}]", p) for i, m in enumerate(req.messages)
            for j, p in enumerate(m.content if isinstance(m.content, list) else []) if isinstance(p, ImagePart)]


def data_url_bytes(max_image_bytes: int) -> int:
    """The longest data URL of an image of max_image_bytes (base64 is 4/3 of the bytes, plus its header)."""
    return max_image_bytes * 4 // 3 + 256


def check_images(req: ChatRequest, info: ModelInfo) -> None:
    """What the served model's config says about images (a repository packaged before images, which says
    nothing, is left to the model): refused naming the part."""
    parts = image_parts(req)
    if not parts:
        return
    support = info.parameters.get("images")
    if support is not None and support != "true":
        raise RequestError(f"{parts[0][0]}: {support}", param=parts[0][0])
    most = info.limit("max_images_per_request", 0)
    if most and len(parts) > most:
        raise RequestError(f"{parts[most][0]}: more than {most} images in one request, this deployment's limit: send "
                           "fewer images", param=parts[most][0])
    cap = info.limit("max_image_bytes", 0)
    for param, part in parts:
        url = part.image_url.url
        if cap and url.startswith("data:") and len(url) > data_url_bytes(cap):
            raise RequestError(f"{param}: the image is over this deployment's limit of {cap} bytes "
                               f"({len(url)} characters of base64)", param=param)


def chat_request(req: ChatRequest, info: ModelInfo) -> TritonRequest:
    """The model's inputs for a chat request; its image URLs must be data URLs by now (media.inline fetches the
    allowed http(s) ones)."""
    check_images(req, info)
    for param, part in image_parts(req):
        if not part.image_url.url.startswith("data:"):
            raise RequestError(f"{param}: only data URLs reach the model; this one was not fetched "
                               f"({part.image_url.url[:40]!r})", param=param)
    fields = common_fields(req, info)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.model_content()}
                for m in req.messages]
    fields["messages"] = json.dumps(messages, ensure_ascii=False)
    if _need(info, "chat_template_kwargs", "chat_template_kwargs", bool(req.chat_template_kwargs)):
        fields["chat_template_kwargs"] = json.dumps(req.chat_template_kwargs, ensure_ascii=False)
    if info.has("separate_reasoning"):
        fields["separate_reasoning"] = True
    _logprobs(info, fields, "logprobs", req.logprobs, req.top_logprobs or 0)
    _prompt_scores(info, fields, "prompt_logprobs", req.prompt_logprobs)
    return TritonRequest(fields, req.n)


DEFAULT_IMAGE_BYTES = 10 * 1024 * 1024  # the fetch cap for a repository that does not say (packaged before images)


async def chat_request_with_images(req: ChatRequest, info: ModelInfo, media: MediaOptions) -> TritonRequest:
    """`chat_request` after checking the images against the served model (before fetching anything) and fetching
    the allowed http(s) ones with the deployment's byte cap."""
    check_images(req, info)
    try:
        await inline(image_parts(req), media, info.limit("max_image_bytes", DEFAULT_IMAGE_BYTES))
    except MediaError as e:
        raise RequestError(e.message, param=e.param) from None
    return chat_request(req, info)


def completion_requests(req: CompletionRequest, info: ModelInfo) -> list[TritonRequest]:
    """One model request per prompt (each with n sequences); raw text, no chat template."""
    fields = common_fields(req, info)
    _logprobs(info, fields, "logprobs", req.logprobs is not None, req.logprobs or 0)
    _prompt_scores(info, fields, "echo" if req.echo else "prompt_logprobs", req.prompt_scores)
    out = []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            out.append(TritonRequest({**fields, "text_input": prompt, "chat": False}, req.n))
        else:
            _need(info, "input_ids", "prompt", True)
            out.append(TritonRequest({**fields, "input_ids": list(prompt)}, req.n))
    return out


# the tokenizer endpoints (vLLM's shapes) ------------------------------------------------------------------
class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: Literal[False] = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=MAX_INT32)]]


def parse_tokenize(body: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """vLLM's /tokenize body: `prompt` (text, as it is) or `messages` (through the chat template)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    chat = isinstance(data, dict) and "messages" in data
    return parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)


def tokenize_fields(req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
    """The tokenizer model's inputs for one /tokenize request."""
    fields: dict[str, Any] = {"add_special_tokens": req.add_special_tokens, "return_token_strs": req.return_token_strs}
    if isinstance(req, TokenizeChatRequest):
        for i, m in enumerate(req.messages):
            if m.images:
                j = next(j for j, p in enumerate(m.content) if isinstance(p, ImagePart))
                param = f"messages[{i}].content[{j}]"
                raise RequestError(f"{param}: /tokenize counts text only: the tokenizer model decodes no images, so it "
                                   "cannot count an image's positions (a chat completion's usage.prompt_tokens counts "
                                   "them)", param=param)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        fields["messages"] = json.dumps(messages, ensure_ascii=False)
        fields["add_generation_prompt"] = req.add_generation_prompt
        if req.chat_template_kwargs:
            fields["chat_template_kwargs"] = json.dumps(req.chat_template_kwargs, ensure_ascii=False)
    else:
        fields["text_input"] = req.prompt
    return fields
