"""A request as Dynamo's frontend hands it to the worker, described for the one request mapping.

Dynamo's frontend validates the OpenAI body itself, renders the chat template, tokenizes, and sends the worker a
"preprocessed request": `token_ids`, `stop_conditions`, `sampling_options`, `output_options` and the client's
`nvext.annotations` (strings). `describe` turns it back into what nld-trt's OpenAI front end would have built from
the same body, a `mapping.Generation` (the same strict validation, ranges and refusals) with a `TokenPrompt` and
`Outputs`, so both front ends reach the model through `mapping.triton_requests` and nothing else.

- The fields Dynamo knows travel natively (`max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `n`, `seed`,
  `stop`, `stop_token_ids`, `min_tokens`, `max_thinking_tokens` via `nvext.max_thinking_tokens`); its floats
  arrive as float32 values (0.7 -> 0.699999988), which the model reads as FP32 anyway.
- NLD's own fields cannot ride as extra body keys (Dynamo's frontend refuses unknown keys before routing), so
  they come as annotations `nld.NAME=VALUE`: `extra_body={"nvext": {"annotations": ["nld.mode=dlm",
  "nld.block_length=32"]}}`. VALUE is JSON when it parses as JSON (`32`, `0.9`, `true`, `["a", "b"]`), the bare
  string otherwise (`dlm`). Other annotations are Dynamo's own and left alone.
- What nld-trt does not implement is refused as the OpenAI front end refuses it (penalties, guided decoding,
  ignore_eos, beam search, best_of other than n); prompt log-probabilities (echo) have no way back through
  Dynamo's response and are refused naming nld-trt's own OpenAI front end.
- Dynamo's frontend tokenizes a `/v1/completions` text prompt without the BOS token that nld-trt's raw encode
  adds (chat prompts get it from the template): `describe` puts the tokenizer's leading special tokens back
  when the ids do not start with them, so a text prompt reaches the model as the direct front end sends it.
"""

from __future__ import annotations

import json
from typing import Any

from ..openai.mapping import Generation, Outputs, RequestError, TokenPrompt, refuse_not_implemented, validate

ANNOTATION_PREFIX = "nld."
# NLD's fields that Dynamo's request has no place for: they come as annotations
ANNOTATED = ("mode", "block_length", "threshold", "steps_per_block", "acceptance", "draft", "lora", "allow_lossy",
             "bad_words")


def annotations(values: list[str] | None) -> dict[str, Any]:
    """NLD's fields from `nld.NAME=VALUE` annotations (others are Dynamo's: ignored)."""
    fields: dict[str, Any] = {}
    for item in values or ():
        if not isinstance(item, str) or not item.startswith(ANNOTATION_PREFIX):
            continue
        name, eq, raw = item[len(ANNOTATION_PREFIX):].partition("=")
        if not eq:
            raise RequestError(f"annotation {item!r} has no value: write {ANNOTATION_PREFIX}NAME=VALUE, e.g. "
                               f"{ANNOTATION_PREFIX}mode=dlm", param="nvext.annotations")
        if name not in ANNOTATED:
            native = f" ({name} is a request field of its own: send it as one)" if name in Generation.model_fields else ""
            raise RequestError(f"unknown annotation {ANNOTATION_PREFIX}{name}{native}: the NLD annotations are "
                               f"{', '.join(ANNOTATION_PREFIX + n for n in ANNOTATED)}", param="nvext.annotations")
        if name in fields:
            raise RequestError(f"annotation {ANNOTATION_PREFIX}{name} is given twice", param="nvext.annotations")
        try:
            fields[name] = json.loads(raw)
        except json.JSONDecodeError:
            fields[name] = raw
    return fields


def _unsupported(sampling: dict[str, Any], stop: dict[str, Any], output: dict[str, Any]) -> None:
    """What Dynamo carries and nld-trt does not implement, refused as the OpenAI front end refuses it."""
    refuse_not_implemented({
        "frequency_penalty": sampling.get("frequency_penalty"), "presence_penalty": sampling.get("presence_penalty"),
        "repetition_penalty": sampling.get("repetition_penalty"),
        "include_stop_str_in_output": sampling.get("include_stop_str_in_output"),
        "ignore_eos": stop.get("ignore_eos"),  # skip_special_tokens is the frontend's: it detokenizes
        "response_format": None if sampling.get("guided_decoding") is None else sampling["guided_decoding"],
    })
    if sampling.get("use_beam_search"):
        raise RequestError("beam search is not supported by nld-trt", param="use_beam_search")
    if sampling.get("length_penalty") not in (None, 1, 1.0):
        raise RequestError("length_penalty is not supported by nld-trt (it has no beam search)", param="length_penalty")
    best_of, n = sampling.get("best_of"), sampling.get("n") or 1
    if best_of is not None and best_of != n:
        raise RequestError(f"best_of {best_of} differs from n {n}: nld-trt returns every sequence it generates, so "
                           "best_of can only equal n", param="best_of")
    if output.get("prompt_logprobs") is not None:
        raise RequestError("prompt log-probabilities (echo, prompt_logprobs) cannot come back through Dynamo's "
                           "frontend: ask nld-trt's own OpenAI front end (nld-trt serve / nld-trt openai)",
                           param="prompt_logprobs")


def describe(request: dict[str, Any], bos: list[int] | tuple[int, ...] = ()) -> tuple[Generation, TokenPrompt, Outputs]:
    """A preprocessed Dynamo request as the mapping's description; RequestError names what is wrong.

    `bos`: the special tokens the model's raw encode puts before a text (put back when the ids lack them)."""
    stop = request.get("stop_conditions") or {}
    sampling = request.get("sampling_options") or {}
    output = request.get("output_options") or {}
    _unsupported(sampling, stop, output)
    annotated = annotations(request.get("annotations"))
    data = {
        "max_tokens": stop.get("max_tokens"), "stop": stop.get("stop") or None,
        "stop_token_ids": stop.get("stop_token_ids") or None, "min_tokens": stop.get("min_tokens"),
        "max_thinking_tokens": stop.get("max_thinking_tokens"),
        "temperature": sampling.get("temperature"), "top_p": sampling.get("top_p"), "top_k": sampling.get("top_k"),
        "min_p": sampling.get("min_p"), "seed": sampling.get("seed"), "n": sampling.get("n") or 1, **annotated,
    }
    try:
        generation = validate(Generation, {k: v for k, v in data.items() if v is not None})
    except RequestError as e:  # name an annotated field as the client wrote it
        if e.param in annotated:
            raise RequestError(f"{ANNOTATION_PREFIX}{e.message}", param="nvext.annotations") from None
        raise
    ids = [int(t) for t in request.get("token_ids") or ()]
    if not ids:
        raise RequestError("the prompt is empty: send some text", param="prompt")
    if bos and ids[: len(bos)] != list(bos):
        ids = list(bos) + ids
    top = output.get("logprobs")
    outputs = Outputs(logprobs=top is not None, top_logprobs=int(top or 0), logprobs_param="logprobs")
    return generation, TokenPrompt(ids), outputs


def leading_special_tokens(encode: Any) -> list[int]:
    """The ids a raw encode puts before the text (a BOS), from `encode(text, add_special_tokens)`; [] when it adds
    none, or adds some after the text (then nothing is put back: the difference would not be only a prefix)."""
    probe = "Hello"
    plain, full = list(encode(probe, False)), list(encode(probe, True))
    extra = len(full) - len(plain)
    if extra <= 0 or full[extra:] != plain:
        return []
    return full[:extra]
