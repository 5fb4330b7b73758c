"""The `nld_tokenizer` model of a repository: the served checkpoint's tokenizer, over Triton.

Clients that need token ids without the model's files ask it: the OpenAI front end's `/tokenize`,
`/detokenize` and `/tokenizer_info` (vLLM's endpoints, which lm-eval's `local-completions` uses as its
remote tokenizer), and its `echo` of prompts sent as token ids. It may run on another host than the front
end, which then needs only the gRPC address. It is its own light model (no PyTorch, one small process), as
TensorRT-LLM's repositories have their `preprocessing` and `postprocessing` models beside the engine.

One request does one of: tokenize `text_input` (as it is) or `messages` (through the chat template),
detokenize `input_ids`, or, with neither, answer `tokenizer_info` alone. `handle` is pure Python, tested
without a server.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import GenerationError
from ..tokenizer import NLDTokenizer
from .protocol import TensorSpec, _flag, conversation, gather_specs, prompt_fields, template_kwargs, text, token_ids

MODEL = "nld_tokenizer"
# the artifacts it reads (and checks against the repository's manifest)
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", doc="text to tokenize, as it is (no chat template)"),
    TensorSpec("messages", "TYPE_STRING", doc="instead: a JSON list of {role, content}, through the chat template",
               kind="json"),
    TensorSpec("add_special_tokens", "TYPE_BOOL", doc="default true for text_input, false for messages (vLLM's)"),
    TensorSpec("add_generation_prompt", "TYPE_BOOL", doc="messages: end with the assistant turn's opening (default true)"),
    TensorSpec("chat_template_kwargs", "TYPE_STRING", doc="messages: a JSON object for the chat template", kind="json"),
    TensorSpec("input_ids", "TYPE_INT32", "[ -1 ]", "token ids to detokenize (special tokens kept)", "list"),
    TensorSpec("return_token_strs", "TYPE_BOOL", doc="also token_strs, each token's text"),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("token_ids", "TYPE_INT32", "[ -1 ]", "the tokens of text_input or messages"),
    TensorSpec("token_strs", "TYPE_STRING", "[ -1 ]", "with return_token_strs: each token's text"),
    TensorSpec("text_output", "TYPE_STRING", "[ -1 ]", "the text of input_ids"),
    TensorSpec("tokenizer_info", "TYPE_STRING", doc="JSON: tokenizer_config.json's fields, tokenizer_class, the chat "
               "template, the special tokens, vocab_size"),
)


def info(tokenizer: NLDTokenizer) -> dict[str, Any]:
    """What vLLM's `/tokenizer_info` answers: the tokenizer's configuration (tokenizer_config.json) with its
    class, chat template and special tokens always present (None when the checkpoint has none)."""
    config = {k: v for k, v in tokenizer.config.items() if _jsonable(v)}
    return {
        **config,
        "tokenizer_class": config.get("tokenizer_class") or "PreTrainedTokenizerFast",
        "chat_template": tokenizer.chat_template,
        **{k: tokenizer.special_token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "vocab_size": tokenizer.vocab_size,
    }


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def handle(tokenizer: NLDTokenizer, inputs: dict[str, Any], parameters: Any, max_prompt_bytes: int,
           max_ids: int, wanted: set[str] | None = None) -> dict[str, Any]:
    """One request's outputs (name -> Python value; `wanted`: only these, None: all); GenerationError names a
    bad field."""
    fields = gather_specs(INPUTS, inputs, parameters)
    prompt_fields(fields, max_prompt_bytes)
    out: dict[str, Any] = {}
    if wanted is None or "tokenizer_info" in wanted:
        out["tokenizer_info"] = json.dumps(info(tokenizer), ensure_ascii=False)
    if fields.get("input_ids") is not None:
        out["text_output"] = tokenizer.decode(token_ids(fields["input_ids"], tokenizer.vocab_size, max_ids),
                                              skip_special_tokens=False)
        return out
    if fields.get("messages") is not None:
        messages, kwargs = conversation(fields), template_kwargs(fields)
        generation = _flag("add_generation_prompt", fields.get("add_generation_prompt"), True)
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, **kwargs)
        ids = tokenizer.encode(rendered, _flag("add_special_tokens", fields.get("add_special_tokens"), False))
    elif fields.get("text_input") is not None:
        ids = tokenizer.encode(text("text_input", fields["text_input"]),
                               _flag("add_special_tokens", fields.get("add_special_tokens"), True))
    else:
        return out
    out["token_ids"] = ids
    if _flag("return_token_strs", fields.get("return_token_strs"), False):
        out["token_strs"] = [tokenizer.token_text(t) for t in ids]
    return out
