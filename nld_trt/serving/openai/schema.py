"""OpenAI request validation, and the one mapping (mapping.py) each request goes through to the model.

Every field of `/v1/chat/completions` and `/v1/completions` is checked here (pydantic, strict: `"5"` is not
an integer) before anything reaches Triton, so a bad request gets an OpenAI-shaped 400 whose message and
`param` name the field. Fields nld-trt does not implement (tools, response_format json_schema, penalties,
logit_bias, ...) are refused unless they carry their default value; unknown fields are refused too:
nothing is silently ignored except `user` and its successors. NLD's own fields (`mode`, `block_length`,
`threshold`, `top_k`, `min_p`, `max_thinking_tokens`, `chat_template_kwargs`, `stop_token_ids`) come as
extra body keys, which is what the OpenAI SDK's `extra_body` sends; so do `min_tokens`, `steps_per_block`,
`acceptance`, `draft`, `lora` and `allow_lossy`, the model's own names, and vLLM's `bad_words` and
`prompt_logprobs`.

The sampling and decoding fields are mapping.Generation's, shared with the Dynamo worker; `chat_request` and
`completion_requests` describe an OpenAI request as a Generation, prompts and Outputs and hand them to
`mapping.triton_requests`, the one place a request becomes the served model's inputs.

Images: `messages[].content` may hold OpenAI's `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`
parts in user messages. `image_parts` lists them, `check_images` refuses what the served model cannot take (a
text model, more images than the deployment allows, a data URL over its byte cap) naming the part
(`messages[0].content[1]`, as the model names it too); allowed http(s) URLs are fetched (media.py) before
`chat_request`, which sends only data URLs, inline, in the content parts of the `messages` input.
`chat_request_with_images` does the three in order: what a front end (the FastAPI app, the Dynamo worker) calls.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .media import MediaError, MediaOptions, inline
from .mapping import (MAX_INT32, MAX_TOP_LOGPROBS, ChatPrompt, Generation, Outputs, RequestError,
                      Strict, TextPrompt, TokenPrompt, TritonRequest, refuse_not_implemented, triton_requests, validate)
from .triton import ModelInfo

__all__ = ["ChatRequest", "CompletionRequest", "DetokenizeRequest", "RequestError", "TritonRequest", "chat_request",
           "completion_requests", "parse", "parse_tokenize", "tokenize_fields"]

MAX_PROMPTS = 64  # prompts per /v1/completions request
PROMPT_FORMS = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
IGNORED = ("user", "safety_identifier", "prompt_cache_key")  # end-user identifiers: accepted, not used


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name: usage so far on every chunk (the web page's live stats)


class TextPart(Strict):
    type: Literal["text"]
    text: str


DETAILS = ("auto", "low", "high")


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model sees every image at its own resolution


class ImagePart(Strict):
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


class Message(Strict):
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


class _Request(Generation):
    """The fields both endpoints share: Generation's, and the OpenAI request's own."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stream_options(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", param="stream_options")
        return self


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

    @property
    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


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

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [p]
        return list(p)


def parse(cls: type[Strict], body: bytes) -> Any:
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
    refuse_not_implemented(data)
    return validate(cls, data)


# the model's inputs: through the one mapping ------------------------------------------------------------
def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The conversation as the model's `messages` input takes it (developer is the system role there)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.model_content()} for m in messages]


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
    prompt = ChatPrompt(chat_messages(req.messages), req.chat_template_kwargs)
    outputs = Outputs(req.logprobs, req.top_logprobs or 0, "logprobs", req.prompt_logprobs, "prompt_logprobs")
    return triton_requests(req, [prompt], outputs, info, "messages")[0]


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
    outputs = Outputs(req.logprobs is not None, req.logprobs or 0, "logprobs", req.prompt_scores,
                      "echo" if req.echo else "prompt_logprobs")
    prompts = [TextPrompt(p) if isinstance(p, str) else TokenPrompt(list(p)) for p in req.prompts()]
    return triton_requests(req, prompts, outputs, info, "prompt")


# the tokenizer endpoints (vLLM's shapes) ------------------------------------------------------------------
class TokenizeCompletionRequest(Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: Literal[False] = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
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
        fields["messages"] = json.dumps(chat_messages(req.messages), ensure_ascii=False)
        fields["add_generation_prompt"] = req.add_generation_prompt
        if req.chat_template_kwargs:
            fields["chat_template_kwargs"] = json.dumps(req.chat_template_kwargs, ensure_ascii=False)
    else:
        fields["text_input"] = req.prompt
    return fields
