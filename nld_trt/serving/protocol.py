"""The wire protocol of the `nld` and `nld_sync` Triton models: tensor names, types and request parsing.

Inputs carry TensorRT-LLM's names and types where its Triton ensemble has them (`text_input`, `max_tokens`,
`stream`, `temperature`, `top_k`, `top_p`, `seed`, `end_id`, `stop_words`, `return_log_probs`, ...: its
clients send them as [1, 1] batched tensors, lists as [1, N]), so its clients and benchmarks work unchanged;
`bad_words` (strings) and its tensorrt_llm model form `bad_words_list` ([2, N] ids) are TensorRT-LLM's too.
NLD adds `mode`, `block_length`, `threshold`, `min_p`, `chat`, `messages`, `input_ids`, `prompt_logprobs` and
the rest of `INPUTS`. Images (a vision-language model): TensorRT-LLM's multimodal ensemble inputs
`image_url_input` (data URLs) and `image_bytes_input` (RGB pixels, with `image_sizes_input`) beside a text
prompt, or image parts inside `messages` (nld_trt/prompt.py says where the images go); their count and sizes
are checked here, before any is decoded. TensorRT-LLM inputs that nld-trt does not implement (beam search,
penalties, prompt tables, ...) are accepted at their default value and refused with a clear error otherwise,
never ignored.

Any input may also come as a request parameter (inputs win); an unknown parameter is refused with the list of
known ones. One integer convention: every integer input is INT32, as TensorRT-LLM types its own, except where
TensorRT-LLM chose otherwise (`seed` and the other ids it declares UINT64). Triton refuses a tensor of another
type itself; a request parameter (JSON) carries any integer and is range-checked here
(triton_model_repo/README.md, "Types").

Parsing is pure Python over already-extracted values, so it is tested without a server; the values are
checked by `GenerationParams.validate`, plus the deployment's limits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import GenerationError
from ..prompt import Prompt

if TYPE_CHECKING:
    from ..runtime import NLD


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # the Triton config type
    dims: str = "[ 1 ]"
    doc: str = ""
    kind: str = "scalar"  # scalar | list | json (a JSON text) | words (TensorRT-LLM's [2, N] word-list form) | array
    refused: bool = False  # not implemented: accepted only absent, empty or at one of `defaults`
    defaults: tuple = ()

    @property
    def wire_type(self) -> str:
        """The datatype name clients use (tritonclient InferInput)."""
        return {"TYPE_STRING": "BYTES"}.get(self.dtype, self.dtype.removeprefix("TYPE_"))


def _refused(name: str, dtype: str, defaults: tuple, dims: str = "[ 1 ]") -> TensorSpec:
    return TensorSpec(name, dtype, dims, "TensorRT-LLM's; not implemented: refused unless at its default",
                      "list" if dims != "[ 1 ]" else "scalar", refused=True, defaults=defaults)


INPUTS: tuple[TensorSpec, ...] = (
    # the prompt: one of
    TensorSpec("text_input", "TYPE_STRING", doc="the prompt, UTF-8; with chat=true (default) one user turn"),
    TensorSpec("messages", "TYPE_STRING", doc="instead of text_input: a JSON list of {role, content}", kind="json"),
    TensorSpec("input_ids", "TYPE_INT32", "[ -1 ]", "instead of text_input: the prompt as token ids", "list"),
    # images beside text_input or input_ids (a vision-language model), TensorRT-LLM's multimodal names and types
    TensorSpec("image_url_input", "TYPE_STRING", "[ -1 ]", "images as data URLs (data:image/png;base64,...), one per "
               "element; the model fetches no http(s) URL", "list"),
    TensorSpec("image_bytes_input", "TYPE_UINT8", "[ -1, -1, -1, -1 ]", "images as RGB pixels [images, height, width, "
               "3] (or RGBA), zero-padded to the largest, as TensorRT-LLM's Pixtral client sends them", "array"),
    TensorSpec("image_sizes_input", "TYPE_INT64", "[ -1, 2 ]", "with image_bytes_input: each image's [height, width] "
               "(default: the padded size)", "array"),
    # TensorRT-LLM's ensemble inputs that nld-trt implements
    TensorSpec("max_tokens", "TYPE_INT32", doc="tokens to generate at most"),
    TensorSpec("stream", "TYPE_BOOL", doc="nld only: one response per decoding step (default false)"),
    TensorSpec("temperature", "TYPE_FP32", doc="0 is greedy"),
    TensorSpec("top_k", "TYPE_INT32", doc="sampling: keep the k most likely tokens (0: off)"),
    TensorSpec("top_p", "TYPE_FP32", doc="sampling: nucleus mass (0 or 1: off, as TensorRT-LLM)"),
    TensorSpec("seed", "TYPE_UINT64", doc="sampling seed (sequence i of a request uses seed + i)"),
    TensorSpec("random_seed", "TYPE_UINT64", doc="TensorRT-LLM's older name for seed"),
    TensorSpec("end_id", "TYPE_INT32", doc="stop token (default: the checkpoint's EOS)"),
    TensorSpec("pad_id", "TYPE_INT32", doc="accepted and unused: responses are never padded"),
    TensorSpec("stop_words", "TYPE_STRING", "[ -1 ]", "stop strings: the text ends just before the first one", "list"),
    TensorSpec("bad_words", "TYPE_STRING", "[ -1 ]", "words no output may complete (each encoded as it is)", "list"),
    TensorSpec("bad_words_list", "TYPE_INT32", "[ 2, -1 ]", "bad words as token ids, TensorRT-LLM's [2, N] form: "
               "the words' ids one after another, then each word's end offset (padded with 0 and -1)", "words"),
    TensorSpec("min_tokens", "TYPE_INT32", doc="no EOS or stop token before this many tokens"),
    TensorSpec("min_length", "TYPE_INT32", doc="TensorRT-LLM's older name for min_tokens"),
    TensorSpec("return_log_probs", "TYPE_BOOL", doc="return each token's log-probability"),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", doc="false: unary responses start with the prompt"),
    TensorSpec("num_return_sequences", "TYPE_INT32", doc="nld only: sequences decoded for this prompt"),
    TensorSpec("return_num_input_tokens", "TYPE_BOOL", doc="also send num_input_tokens"),
    TensorSpec("return_num_output_tokens", "TYPE_BOOL", doc="also send num_output_tokens"),
    # TensorRT-LLM's ensemble inputs that nld-trt does not implement
    _refused("beam_width", "TYPE_INT32", (1,)),
    _refused("length_penalty", "TYPE_FP32", (1.0,)),
    _refused("repetition_penalty", "TYPE_FP32", (1.0,)),
    _refused("presence_penalty", "TYPE_FP32", (0.0,)),
    _refused("frequency_penalty", "TYPE_FP32", (0.0,)),
    _refused("return_context_logits", "TYPE_BOOL", (False,)),
    _refused("return_generation_logits", "TYPE_BOOL", (False,)),
    _refused("return_perf_metrics", "TYPE_BOOL", (False,)),
    _refused("decoder_text_input", "TYPE_STRING", ("",)),
    _refused("prompt_embedding_table", "TYPE_FP16", (), "[ -1, -1 ]"),
    _refused("prompt_table_extra_id", "TYPE_UINT64", ()),
    _refused("prompt_vocab_size", "TYPE_INT32", (0,)),
    _refused("embedding_bias_words", "TYPE_STRING", ("",), "[ -1 ]"),
    _refused("embedding_bias_weights", "TYPE_FP32", (), "[ -1 ]"),
    _refused("lora_task_id", "TYPE_UINT64", ()),
    _refused("lora_weights", "TYPE_FP16", (), "[ -1, -1 ]"),
    _refused("lora_config", "TYPE_INT32", (), "[ -1, 3 ]"),
    _refused("guided_decoding_guide_type", "TYPE_STRING", ("",)),
    _refused("guided_decoding_guide", "TYPE_STRING", ("",)),
    _refused("num_draft_tokens", "TYPE_INT32", (0,)),
    _refused("use_draft_logits", "TYPE_BOOL", (False,)),
    # NLD's own
    TensorSpec("mode", "TYPE_STRING", doc="ar | dlm | linear_spec | auto (default: the deployment's)"),
    TensorSpec("allow_lossy", "TYPE_BOOL", doc="auto may also choose dlm"),
    TensorSpec("block_length", "TYPE_INT32", doc="dlm / linear_spec block length"),
    TensorSpec("threshold", "TYPE_FP32", doc="confidence threshold in [0, 1]"),
    TensorSpec("steps_per_block", "TYPE_INT32", doc="dlm: denoising passes per block at most"),
    TensorSpec("acceptance", "TYPE_STRING", doc="linear_spec sampling: speculative | official"),
    TensorSpec("draft", "TYPE_STRING", doc="linear_spec with threshold > 0: repeat | once"),
    TensorSpec("lora", "TYPE_BOOL", doc="linear_spec: draft with the LoRA adapter (default true)"),
    TensorSpec("min_p", "TYPE_FP32", doc="sampling: drop tokens below min_p x the top probability"),
    TensorSpec("top_logprobs", "TYPE_INT32", doc="with return_log_probs: the N most likely alternatives"),
    TensorSpec("stop_token_ids", "TYPE_INT32", "[ -1 ]", "tokens that end generation", "list"),
    TensorSpec("prompt_logprobs", "TYPE_INT32", doc="each prompt token's log-probability and the N most likely "
               "alternatives (0-20); with it max_tokens may be 0 (score the prompt only)"),
    TensorSpec("chat", "TYPE_BOOL", doc="apply the chat template to text_input (default true)"),
    TensorSpec("chat_template_kwargs", "TYPE_STRING", doc='a JSON object for the chat template, e.g. {"enable_thinking": true}',
               kind="json"),
    TensorSpec("max_thinking_tokens", "TYPE_INT32", doc="thinking budget: end-think is forced at this output index"),
    TensorSpec("separate_reasoning", "TYPE_BOOL", doc="text_output carries the answer, reasoning_output the thinking"),
    TensorSpec("kv_events", "TYPE_BOOL", doc="nld only, alone: subscribe to the prefix cache's KV events (the kv_events "
               "output; nld_trt/serving/kv_events.py)"),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", "[ -1 ]", "the new text (streaming: this step's delta)"),
    TensorSpec("output_ids", "TYPE_INT32", "[ -1 ]", "the new token ids (streaming: this step's)"),
    TensorSpec("num_tokens", "TYPE_INT32", doc="tokens generated so far"),
    TensorSpec("nfe", "TYPE_INT32", doc="forward passes so far, the prefill counted as one"),
    TensorSpec("tpf", "TYPE_FP32", doc="tokens per forward pass so far"),
    TensorSpec("finish_reason", "TYPE_STRING", doc="a sequence's last response: eos | length | stop"),
    TensorSpec("stats", "TYPE_STRING", doc="a sequence's last response: JSON stats, incl. KV-slot occupancy"),
    TensorSpec("sequence_index", "TYPE_INT32", doc="which of num_return_sequences this response belongs to"),
    TensorSpec("batch_index", "TYPE_INT32", doc="always 0: one prompt per request"),
    TensorSpec("output_log_probs", "TYPE_FP32", "[ -1, -1 ]",
               "with return_log_probs: the new tokens' log-probabilities, [1, 1, n] as TensorRT-LLM's [batch, beam, n]"),
    TensorSpec("cum_log_probs", "TYPE_FP32", "[ -1 ]", "with return_log_probs: their sum so far, [1, 1]"),
    TensorSpec("logprobs", "TYPE_STRING", doc="with return_log_probs: JSON, per new token: token_id, token, bytes, "
               "logprob, top_logprobs"),
    TensorSpec("reasoning_output", "TYPE_STRING", "[ -1 ]", "with separate_reasoning: the new thinking text"),
    TensorSpec("prompt_logprobs", "TYPE_STRING", doc="with prompt_logprobs, in each sequence's first response: JSON, per "
               "prompt token: token_id, token, bytes, logprob (null for the first), rank, top_logprobs"),
    TensorSpec("num_input_tokens", "TYPE_INT32", doc="the prompt's tokens"),
    TensorSpec("num_output_tokens", "TYPE_INT32", doc="tokens generated so far"),
    TensorSpec("kv_events", "TYPE_STRING", doc="with kv_events=true: a JSON list of the prefix cache's KV events, the "
               "first response the cache as it is"),
)

INPUT_TYPES = {t.name: t for t in INPUTS}
ALIASES = {"random_seed": "seed", "min_length": "min_tokens"}  # TensorRT-LLM's older names
MAX_TEMPLATE_KWARGS_BYTES = 16384


@dataclass(frozen=True)
class Limits:
    """What one deployment accepts, from the model's config.pbtxt parameters."""

    max_tokens_cap: int
    default_max_tokens: int
    streaming: bool  # the decoupled model streams; the sync one answers once
    max_prompt_bytes: int = 65536  # text_input / messages, checked before tokenizing
    max_image_bytes: int = 10 * 1024 * 1024  # one image, encoded (a data URL's decoded payload)
    max_image_pixels: int = 32 * 1024 * 1024  # one image, decoded
    max_images: int = 8  # images per request
    max_sequences: int = 8  # num_return_sequences at most
    exclude_input_default: bool = True  # exclude_input_in_output when a request does not say
    default_mode: str = "ar"  # the mode of a request that does not say


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: GenerationParams
    stream: bool
    sequences: int = 1
    echo: bool = False  # unary responses start with the prompt (exclude_input_in_output=false)
    separate_reasoning: bool = False
    thinking: bool = False  # the prompt opens thinking: the output starts as reasoning
    send_counts: bool = False  # num_input_tokens / num_output_tokens asked for
    seeds: list[int] = field(default_factory=list)
    prompt: Prompt | None = None  # the encoded prompt (its image spans and pixels, for a vision-language model)
    # with images and prepare(defer_images=True): the rest of the preparation (decoding and preparing the
    # images, the chat template, the length check), run off the request thread; returns the full Prepared
    deferred: Callable[[], Prepared] | None = None


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


def values(name: str, value: Any) -> list[Any]:
    """The elements of one list input ([1, N] tensor) or of a request parameter (one value)."""
    if hasattr(value, "shape"):
        if value.ndim >= 2 and value.shape[0] != 1:
            raise GenerationError(f"{name} must hold one list per request, got shape {list(value.shape)}: "
                                  "send one prompt per request")
        return [v.item() if hasattr(v, "item") and not isinstance(v, bytes) else v for v in value.reshape(-1)]
    return [value]


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
    raise GenerationError(f"{name} must be a string, got {type(value).__name__} {value!r}")


def gather(inputs: dict[str, Any], parameters: dict[str, Any] | str | None) -> dict[str, Any]:
    """One dict of request fields of the `nld` models: the request parameters, overridden by the input tensors
    present. An unknown parameter is refused, naming the known ones."""
    return gather_specs(INPUTS, inputs, parameters, ALIASES)


def gather_specs(specs: tuple[TensorSpec, ...], inputs: dict[str, Any], parameters: dict[str, Any] | str | None,
                 aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """`gather` for any model's inputs (`specs`)."""
    types = {t.name: t for t in specs}
    aliases = aliases or {}
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters) if parameters else {}
        except json.JSONDecodeError as e:
            raise GenerationError(f"the request parameters are not valid JSON ({e})") from None
    fields: dict[str, Any] = {}
    for k, v in (parameters or {}).items():
        if k not in types:
            raise GenerationError(f"unknown request parameter {k!r}: the known ones are {', '.join(sorted(types))}")
        fields[aliases.get(k, k)] = v
    for name, value in inputs.items():
        if value is None:
            continue
        spec = types[name]
        if spec.kind in ("words", "array"):
            fields[name] = value  # parsed by trtllm_words, image_sources
        else:
            fields[aliases.get(name, name)] = values(name, value) if spec.kind == "list" else scalar(name, value)
    return fields


def trtllm_words(name: str, value: Any) -> list[tuple[int, ...]]:
    """Words from TensorRT-LLM's [2, N] form (one request: a [1, 2, N] tensor, or [[ids], [offsets]] as a request
    parameter): row 0 the words' token ids one after another (padded with 0), row 1 each word's end offset
    into row 0 (cumulative, padded with -1)."""
    if hasattr(value, "shape"):
        shape = list(value.shape)
        if len(shape) == 3 and shape[0] != 1:
            raise GenerationError(f"{name} must hold one [2, N] list per request, got shape {shape}: send one prompt "
                                  "per request")
        if len(shape) not in (2, 3) or shape[-2] != 2:
            raise GenerationError(f"{name} must be TensorRT-LLM's [2, N] form ([1, 2, N] batched), got shape {shape}")
        rows = value.reshape(2, -1).tolist()
    else:
        rows = value
        if not (isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, list) for r in rows)):
            raise GenerationError(f"{name} must be [[token ids...], [end offsets...]], got {str(value)[:80]}")
    ids = [_integer(name, t) for t in rows[0]]
    ends = [_integer(name, t) for t in rows[1]]
    ends = ends[: ends.index(-1)] if -1 in ends else ends
    words, begin = [], 0
    for end in ends:
        if isinstance(end, bool) or not isinstance(end, int) or not begin < end <= len(ids):
            raise GenerationError(f"{name}: the offsets (row 1) must rise within the {len(ids)} ids of row 0, then -1 "
                                  f"padding; got {rows[1]}")
        words.append(tuple(ids[begin:end]))
        begin = end
    return words


def bad_words(nld: NLD, fields: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """`bad_words` strings (each encoded as it is, empty ones skipped, as TensorRT-LLM does) and the words of
    `bad_words_list`, as token ids."""
    texts = [text("bad_words", x) for x in fields.get("bad_words") or ()]
    listed = trtllm_words("bad_words_list", fields["bad_words_list"]) if fields.get("bad_words_list") is not None else []
    return nld.tokenizer.word_ids([t for t in texts if t]) + tuple(listed)


def _integer(name: str, v: Any) -> Any:
    """Integral floats from JSON parameters (`"max_tokens": 8.0`) become ints; validation checks the range."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, (str, bytes)) or isinstance(v, float):
        raise GenerationError(f"{name} must be an integer, got {v!r}")
    return v


def _real(name: str, v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GenerationError(f"{name} must be a number, got {v!r}")
    return float(v)


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


def _json(name: str, v: Any) -> Any:
    try:
        return json.loads(text(name, v))
    except json.JSONDecodeError as e:
        raise GenerationError(f"{name} is not valid JSON ({e}): send it as a JSON text") from None


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    """TensorRT-LLM inputs nld-trt does not implement: fine when empty or at their default, else refused."""
    for name, value in fields.items():
        spec = INPUT_TYPES.get(name)
        if spec is None or not spec.refused:
            continue
        items = [text(name, x) if isinstance(x, bytes) else x for x in (value if isinstance(value, list) else [value])]
        if all(x in spec.defaults for x in items):
            continue
        allowed = " or ".join(repr(x) for x in spec.defaults) if spec.defaults else "absent or empty"
        shown = items if isinstance(value, list) else items[0]
        raise GenerationError(f"{name} is not supported by nld-trt: got {shown!r}, only {allowed} is accepted "
                              "(leave it out)")


def prompt_fields(fields: dict[str, Any], max_bytes: int, image_bytes: int = 0) -> None:
    """At most one prompt field, and text prompts under the byte cap (checked before anything is tokenized);
    `messages` may hold `image_bytes` more for its images' data URLs (prompt_ids checks its text alone)."""
    given = [k for k in ("text_input", "messages", "input_ids") if fields.get(k) is not None]
    if len(given) > 1:
        raise GenerationError(f"send one of text_input, messages and input_ids, not {' and '.join(given)}")
    for name, cap in (("text_input", max_bytes), ("messages", max_bytes + image_bytes)):
        v = fields.get(name)
        if isinstance(v, (bytes, str)) and len(v) > cap:  # a str is at least as many bytes
            raise GenerationError(f"{name} is {len(v)} bytes, over this deployment's cap of {cap}"
                                  + (f" ({max_bytes} of text, the rest for images)" if cap > max_bytes else "")
                                  + ": send a shorter prompt")


def template_kwargs(fields: dict[str, Any]) -> dict[str, Any]:
    """`chat_template_kwargs`: a JSON object of extra chat-template variables (size-capped), or {}."""
    if fields.get("chat_template_kwargs") is None:
        return {}
    raw = text("chat_template_kwargs", fields["chat_template_kwargs"])
    if len(raw.encode()) > MAX_TEMPLATE_KWARGS_BYTES:
        raise GenerationError(f"chat_template_kwargs is over {MAX_TEMPLATE_KWARGS_BYTES} bytes")
    kwargs = _json("chat_template_kwargs", raw)
    if not isinstance(kwargs, dict):
        raise GenerationError(f"chat_template_kwargs must be a JSON object, got {raw[:80]!r}")
    return kwargs


def conversation(fields: dict[str, Any]) -> list[dict[str, Any]]:
    """`messages`: a non-empty JSON list of {role, content} strings (the tokenizer model's: it counts text only,
    so an image part is refused, named)."""
    messages = _json("messages", fields["messages"])
    parts = image_parts(messages)
    if parts:
        raise GenerationError(f"{parts[0][0]}: the tokenizer model counts text only: it decodes no images, so it "
                              "cannot count an image's positions (the nld model's num_input_tokens counts them)")
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise GenerationError('messages must be a non-empty JSON list of {"role": ..., "content": ...}')
    return messages


def token_ids(values: list[Any], vocab_size: int, most: int) -> list[int]:
    """`input_ids`: at most `most` token ids in [0, vocab_size)."""
    ids = [_integer("input_ids", t) for t in values]
    if len(ids) > most:
        raise GenerationError(f"input_ids holds {len(ids)} tokens, more than the {most} KV-cache positions")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise GenerationError(f"input_ids must be token ids in [0, {vocab_size}), got {t!r}")
    return ids


IMAGE_PARTS = ("image", "image_url")


def image_parts(messages: Any) -> list[tuple[str, int]]:
    """(where, data-URL length) of each image content part of a conversation, in order."""
    found = []
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url if url is not None else part.get("image")
                found.append((f"messages[{i}].content[{j}]", len(url) if isinstance(url, str) else 0))
    return found


def image_url_bytes(limits: Limits) -> int:
    """The longest data URL of one image under the byte cap (base64 is 4/3 of the bytes, plus its header)."""
    return limits.max_image_bytes * 4 // 3 + 256


def image_sources(fields: dict[str, Any], limits: Limits) -> list[tuple[str, Any]]:
    """The images of `image_url_input` or `image_bytes_input` (with `image_sizes_input`), as (where, value) for the
    prompt encoder, with their count and sizes checked before any is decoded."""
    urls, pixels, sizes = fields.get("image_url_input"), fields.get("image_bytes_input"), fields.get("image_sizes_input")
    if urls is not None and pixels is not None:
        raise GenerationError("send image_url_input or image_bytes_input, not both")
    if sizes is not None and pixels is None:
        raise GenerationError("image_sizes_input goes with image_bytes_input (each image's [height, width] in it)")
    sources: list[tuple[str, Any]] = []
    if urls is not None:
        items = [u for x in urls for u in (x if isinstance(x, list) else [x])]  # a JSON parameter may hold a list
        for i, u in enumerate(items):
            where = f"image_url_input[{i}]"
            url = text(where, u)
            if not url.startswith(("data:", "http://", "https://")):
                raise GenerationError(f"{where}: send the image inline as a data URL (data:image/png;base64,...), got "
                                      f"{url[:40]!r}: a served request cannot name a local file")
            if url.startswith(("http://", "https://")):
                raise GenerationError(f"{where}: the model fetches no URL: send the image inline as a data URL "
                                      "(data:image/png;base64,...); the OpenAI front end fetches http(s) images from the "
                                      "hosts its --allowed-media-domains lists")
            sources.append((where, url))
    if pixels is not None:
        if not hasattr(pixels, "shape"):
            raise GenerationError("image_bytes_input must be a UINT8 tensor [1, images, height, width, 3]")
        array = pixels[0] if pixels.ndim == 5 and pixels.shape[0] == 1 else pixels
        if array.ndim != 4:
            raise GenerationError(f"image_bytes_input must hold one request's images, [1, images, height, width, 3], "
                                  f"got shape {list(pixels.shape)}")
        boxes = [list(array.shape[1:3])] * array.shape[0]
        if sizes is not None:
            if not hasattr(sizes, "reshape") or sizes.size != 2 * array.shape[0]:
                raise GenerationError(f"image_sizes_input must be an INT64 tensor [1, images, 2], one [height, width] "
                                      f"for each of the {array.shape[0]} images of image_bytes_input")
            boxes = [[_integer("image_sizes_input", v) for v in row] for row in sizes.reshape(-1, 2).tolist()]
        for i, (h, w) in enumerate(boxes):
            where = f"image_bytes_input[{i}]"
            if not (1 <= h <= array.shape[1] and 1 <= w <= array.shape[2]):
                raise GenerationError(f"{where}: image_sizes_input [{h}, {w}] is outside the padded image "
                                      f"[{array.shape[1]}, {array.shape[2]}]")
            sources.append((where, array[i, :h, :w]))
    check_images([(where, len(v) if isinstance(v, str) else 0) for where, v in sources], limits)
    return sources


def check_images(images: list[tuple[str, int]], limits: Limits) -> None:
    """A request's images, (where, data-URL length; 0 for pixels): their count and each data URL's size."""
    if len(images) > limits.max_images:
        raise GenerationError(f"{images[limits.max_images][0]}: more than {limits.max_images} images in one request, "
                              "this deployment's limit: send fewer images")
    for where, n in images:
        if n > image_url_bytes(limits):
            raise GenerationError(f"{where}: the image is over this deployment's limit of {limits.max_image_bytes} bytes")


def prompt_ids(nld: NLD, fields: dict[str, Any], limits: Limits, defer_images: bool = False
               ) -> Prompt | Callable[[], Prompt]:
    """The prompt (`messages` through the chat template, `text_input` templated unless chat=false, or
    `input_ids`, with the images of `image_url_input` / `image_bytes_input`), encoded by the model's one prompt
    encoder (nld_trt/prompt.py) with no access to local files: a served request's images come inline. Sizes and
    counts are checked before tokenizing. With images and `defer_images`, what is cheap is checked now and the
    encoding (decoding and preparing the images) is returned as a function to run later."""
    chat = _flag("chat", fields.get("chat"), True)
    kwargs = template_kwargs(fields)
    vision = nld.prompts.processor is not None
    prompt_fields(fields, limits.max_prompt_bytes, limits.max_images * image_url_bytes(limits) if vision else 0)
    sources = image_sources(fields, limits)
    if fields.get("messages") is not None:
        raw = text("messages", fields["messages"])
        messages = _json("messages", raw)
        parts = image_parts(messages)
        if sources:
            raise GenerationError("with messages, send the images as image_url parts of the messages (data URLs), not "
                                  "as image_url_input or image_bytes_input")
        if parts and not vision:
            raise GenerationError(f"{parts[0][0]}: {nld.prompts.no_images}")
        text_bytes = len(raw) - sum(n for _, n in parts)
        if text_bytes > limits.max_prompt_bytes:
            raise GenerationError(f"messages holds {text_bytes} bytes of text, over this deployment's cap of "
                                  f"{limits.max_prompt_bytes}: send a shorter prompt")
        check_images(parts, limits)
        encode = lambda: nld.prompts.messages(messages, template_kwargs=kwargs, local_files=False)  # noqa: E731
        return encode if parts and defer_images else encode()
    if fields.get("text_input") is not None:
        prompt: str | list[int] = text("text_input", fields["text_input"])
        field_name = "text_input"
    elif fields.get("input_ids") is not None:
        prompt, field_name = [_integer("input_ids", t) for t in fields["input_ids"]], "input_ids"
    else:
        raise GenerationError("missing text_input: send the prompt as the text_input tensor (or messages, or "
                              "input_ids)")
    if not sources:
        if isinstance(prompt, str):
            return nld.prompts.text(prompt, chat=chat, template_kwargs=kwargs, field=field_name)
        return nld.prompts.token_ids(prompt, field=field_name)
    if not vision:
        raise GenerationError(f"{sources[0][0]}: {nld.prompts.no_images}")
    encode = lambda: nld.prompts.with_images(prompt, sources, chat=chat, template_kwargs=kwargs,  # noqa: E731
                                             field=field_name)
    return encode if defer_images else encode()


def stop_strings(fields: dict[str, Any]) -> tuple[str, ...]:
    words = fields.get("stop_words")
    if words is None:
        return ()
    return tuple(w for w in (text("stop_words", x) for x in words) if w)  # TensorRT-LLM skips empty words


def prepare(nld: NLD, fields: dict[str, Any], limits: Limits, defer_images: bool = False) -> Prepared:
    """Validate one request against the model and the deployment; GenerationError names what to fix.

    `defer_images`: a request with images is checked as far as that is cheap, and comes back with `deferred`
    set (its images decoded and prepared later, by whoever runs it: the scheduler's image worker)."""
    from ..decoding import GenerationParams  # here: the tokenizer model imports this module without PyTorch

    _refuse_unsupported(fields)
    mode = fields.get("mode", limits.default_mode)
    mode = text("mode", mode) if isinstance(mode, (bytes, str)) else mode
    end_id = _integer("end_id", fields.get("end_id"))
    top_p = fields.get("top_p")
    thinking_budget = fields.get("max_thinking_tokens")
    end_think = nld.prompts.thinking[1] if thinking_budget is not None and nld.prompts.thinking else None
    if thinking_budget is not None and end_think is None:
        raise GenerationError("max_thinking_tokens needs an end-think token ([/THINK] or </think>) and this tokenizer "
                              "has none")
    logprobs = _flag("return_log_probs", fields.get("return_log_probs"), False)
    strings = {k: text(k, fields[k]) for k in ("acceptance", "draft") if fields.get(k) is not None}
    try:
        params = GenerationParams(
            mode=mode,
            max_new_tokens=_integer("max_tokens", fields.get("max_tokens", limits.default_max_tokens)),
            block_length=_integer("block_length", fields.get("block_length")),
            threshold=None if fields.get("threshold") is None else _real("threshold", fields["threshold"]),
            steps_per_block=_integer("steps_per_block", fields.get("steps_per_block")),
            temperature=_real("temperature", fields.get("temperature", 0.0)),
            top_k=_integer("top_k", fields.get("top_k", 0)),
            top_p=1.0 if top_p is None or top_p == 0 else _real("top_p", top_p),  # TensorRT-LLM: 0 is off
            min_p=_real("min_p", fields.get("min_p", 0.0)),
            seed=_integer("seed", fields.get("seed", 0)),
            eos_token_ids=None if end_id is None else (end_id,),
            stop=stop_strings(fields),
            stop_token_ids=tuple(_integer("stop_token_ids", t) for t in fields.get("stop_token_ids") or ()),
            min_tokens=_integer("min_tokens", fields.get("min_tokens", 0)),
            logprobs=logprobs,
            top_logprobs=_integer("top_logprobs", fields.get("top_logprobs", 0)),
            max_thinking_tokens=_integer("max_thinking_tokens", thinking_budget),
            end_think_token_id=end_think,
            lora=_flag("lora", fields.get("lora"), True),
            allow_lossy=_flag("allow_lossy", fields.get("allow_lossy"), False),
            prompt_logprobs=_integer("prompt_logprobs", fields.get("prompt_logprobs")),
            bad_words=bad_words(nld, fields),
            **strings,
        ).resolved(nld.config)
    except TypeError as e:
        raise GenerationError(f"bad request field: {e}") from None
    try:
        params.validate(nld.config, nld.executor.max_chunk)
    except GenerationError as e:  # speak the wire names
        raise GenerationError(str(e).replace("max_new_tokens", "max_tokens").replace("eos token id", "end_id")
                              .replace("needs logprobs=true", "needs return_log_probs=true")) from None
    if params.max_new_tokens > limits.max_tokens_cap:
        raise GenerationError(
            f"max_tokens {params.max_new_tokens} is over this deployment's cap of {limits.max_tokens_cap}: ask for fewer"
        )
    stream = _flag("stream", fields.get("stream"), False)
    if stream and not limits.streaming:
        raise GenerationError("stream=true needs the decoupled model `nld` (gRPC stream or HTTP generate_stream)")
    n = _integer("num_return_sequences", fields.get("num_return_sequences", 1))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_sequences:
        raise GenerationError(f"num_return_sequences must be an integer in [1, {limits.max_sequences}], got {n!r}")
    if n > 1 and not limits.streaming:
        raise GenerationError("num_return_sequences > 1 needs the decoupled model `nld`, whose responses carry "
                              "sequence_index")
    encoded = prompt_ids(nld, fields, limits, defer_images)
    echo = not _flag("exclude_input_in_output", fields.get("exclude_input_in_output"), limits.exclude_input_default)
    counts = any(_flag(k, fields.get(k), False) for k in ("return_num_input_tokens", "return_num_output_tokens"))
    separate = _flag("separate_reasoning", fields.get("separate_reasoning"), False)
    seeds = [(params.seed + i) % 2**64 for i in range(n)]

    def finish(prompt: Prompt) -> Prepared:
        nld.check_fits(len(prompt.ids), params, "this deployment's limit; shorten the prompt or lower max_tokens",
                       "max_tokens", prompt.describe())
        return Prepared(prompt.ids, params, stream, n, echo and not stream, separate, prompt.thinking, counts, seeds,
                        prompt)

    if isinstance(encoded, Prompt):
        return finish(encoded)
    return Prepared([], params, stream, n, echo and not stream, separate, False, counts, seeds,
                    deferred=lambda: finish(encoded()))
