"""The checkpoint's tokenizer and chat template, read without running checkpoint code.

Encoding uses `tokenizers` on `tokenizer.json`; the chat template is rendered by transformers' sandboxed
Jinja renderer, the same one `apply_chat_template` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError, GenerationError


class NLDTokenizer:
    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the checkpoint needs its tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception on malformed files
            raise CheckpointError(f"{path} is not a readable tokenizer ({str(e).splitlines()[0]}); re-download it") from None
        self.config: dict[str, Any] = {}
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{cfg} is not valid JSON ({e})") from None
        template_file = directory / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text() if template_file.is_file() else self.config.get("chat_template")
        )
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")

    # ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_token(self, key: str) -> str | None:
        v = self.config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return v if isinstance(v, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works, so a long prompt does not stall the decoding thread
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def word_ids(self, words) -> tuple[tuple[int, ...], ...]:
        """Banned words as token ids: a string is encoded as it is, without special tokens (TensorRT-LLM's rule:
        "apples" and " apples" are different words); a list of token ids is kept; a word encoding to nothing
        is skipped."""
        if isinstance(words, (str, bytes)) or not isinstance(words, (list, tuple)):
            raise GenerationError(f"bad_words must be a list of strings or token-id lists, got {words!r}")
        out = []
        for w in words:
            if isinstance(w, str):
                ids = tuple(self.encode(w, add_special_tokens=False))
            elif isinstance(w, (list, tuple)):
                ids = tuple(w)
            else:
                raise GenerationError(f"bad_words must be a list of strings or token-id lists, got {w!r}")
            if ids:
                out.append(ids)
        return tuple(out)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise GenerationError(
                "this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json): "
                "pass the prompt raw (--raw / chat=False)"
            )
        from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
        from transformers.utils.chat_template_utils import render_jinja_template

        specials = {k: self.special_token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in specials.items() if v is not None},
                **kwargs,
            )
        except SecurityError as e:  # the sandbox stopped it before the forbidden access: nothing ran
            raise CheckpointError(
                f"the checkpoint's chat template tried something the Jinja sandbox forbids (SecurityError: {str(e).rstrip('.')}); "
                "nothing ran. Use a trusted chat template, or pass the prompt raw (--raw / chat=False)"
            ) from None
        except TemplateSyntaxError as e:
            raise CheckpointError(f"the checkpoint's chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                                  "fix chat_template.jinja or pass the prompt raw (--raw / chat=False)") from None
        except TemplateError as e:  # raise_exception(...) in the template, or an undefined value it needs
            raise GenerationError(f"the chat template refused this conversation: {e}") from None
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:  # a template bug
            raise CheckpointError(f"the checkpoint's chat template failed ({type(e).__name__}: {e}); fix "
                                  "chat_template.jinja or pass the prompt raw (--raw / chat=False)") from None
        return rendered[0]

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered with the chat template and a generation prompt."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)

    # single tokens, for per-token log-probabilities ---------------------------------------------
    def token_text(self, token_id: int) -> str:
        """One token's text (special tokens included; a partial UTF-8 character shows as U+FFFD)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's raw bytes: byte-level tokens map back through the byte alphabet."""
        piece = self._tok.id_to_token(token_id)
        if piece is not None and type(self._tok.decoder).__name__ == "ByteLevel" and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return self.token_text(token_id).encode("utf-8")


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the rest from U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_alphabet()
