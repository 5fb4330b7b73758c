"""Prompts: the one place text, token ids and chat messages (with images) become what a sequence is fed.

`PromptEncoder` is called by every entry point: the Python API (`NLD.generate`, the CLI) and the serving
protocol (Triton, and through it the OpenAI front end), so the checks, the chat template call, the image
expansion and the thinking-token lookup are the same everywhere. The entry point says which field it speaks
for (`field`, used in error messages) and whether an image may be read from a local file: `local_files=True`
only from the Python API and the CLI, never for a served request, which may send images only inline (data
URLs, bytes, pixel arrays). Nothing is ever fetched from the network.

Images reach a prompt as content parts of chat messages, or beside a text prompt or token ids (Triton's
`image_url_input` / `image_bytes_input`): there, as TensorRT-LLM's Pixtral preprocessing does with its `[IMG]`
tag, the prompt may hold the model's image marker (`<|image_start|>`) once where each image goes, and without
any marker the images come first, before the text.

A `Prompt` holds the token ids, and for each image the span of prompt positions its expanded tokens occupy
with a content digest (`spans`: `(start, end, digest)`, the shape prefix caching keys pages with), plus the
prepared pixels the vision encoder will turn into the rows that replace the image's `<|image_pad|>`
positions at prefill. An image of h x w merged cells expands the template's `<|image_start|>` to
`<|image_start|>` + for each row w pads and one `<|image_break|>`, the last break `<|image_end|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import NLDConfig
from .errors import CheckpointError, GenerationError
from .tokenizer import NLDTokenizer

if TYPE_CHECKING:
    from .vision.processor import ImageProcessor, PreparedImage

# Thinking markers, by name: the Mistral spelling of the text release, ChatML's of the vision-language one.
THINKING_TOKENS = (("[THINK]", "[/THINK]"), ("<think>", "</think>"))
IMAGE_PART_TYPES = ("image", "image_url")


@dataclass(frozen=True)
class ImageSpan:
    """Where one image sits in a prompt: positions start..end-1 (`<|image_start|>` .. `<|image_end|>`)."""

    start: int
    end: int
    digest: str
    grid: tuple[int, int]  # merged cells: (rows, cols)

    def pad_positions(self) -> list[int]:
        """Prompt positions of the image's pads, in the order of the encoder's rows (row by row)."""
        rows, cols = self.grid
        return [self.start + 1 + r * (cols + 1) + c for r in range(rows) for c in range(cols)]


@dataclass
class Prompt:
    """Token ids to prefill, and the images among them (spans + prepared pixels, in prompt order)."""

    ids: list[int]
    images: tuple[ImageSpan, ...] = ()
    pixels: tuple[PreparedImage, ...] = field(default=(), repr=False)
    thinking: bool = False  # the prompt opens a thought the model is to continue

    @property
    def spans(self) -> list[tuple[int, int, str]]:
        """(start, end, digest) per image: with the ids, what identifies the prompt's content."""
        return [(s.start, s.end, s.digest) for s in self.images]

    @property
    def image_positions(self) -> int:
        return sum(s.end - s.start for s in self.images)

    def describe(self) -> str:
        """', M of them for K images' for messages about the prompt's length, '' without images."""
        if not self.images:
            return ""
        k = len(self.images)
        return f", {self.image_positions} of them for {k} image{'s' if k > 1 else ''}"


@dataclass(frozen=True)
class ImageTokens:
    start: int
    pad: int
    brk: int
    end: int

    @classmethod
    def lookup(cls, tokenizer: NLDTokenizer, where: str) -> ImageTokens:
        from .vision.config import IMAGE_TOKEN_NAMES

        ids = {k: tokenizer.token_id(name) for k, name in IMAGE_TOKEN_NAMES.items()}
        missing = [IMAGE_TOKEN_NAMES[k] for k, v in ids.items() if v is None]
        if missing:
            raise CheckpointError(f"{where}: the tokenizer has no {', '.join(missing)} token: a vision-language "
                                  "checkpoint's tokenizer needs the four image tokens")
        return cls(ids["start"], ids["pad"], ids["break"], ids["end"])

    def expand(self, grid: tuple[int, int]) -> list[int]:
        rows, cols = grid
        out = [self.start]
        for _ in range(rows):
            out += [self.pad] * cols + [self.brk]
        out[-1] = self.end
        return out


def thinking_tokens(tokenizer: NLDTokenizer) -> tuple[int, int] | None:
    """(open, close) thinking token ids: the first pair of THINKING_TOKENS the tokenizer has, else None."""
    for open_name, close_name in THINKING_TOKENS:
        pair = tokenizer.token_id(open_name), tokenizer.token_id(close_name)
        if None not in pair:
            return pair
    return None


class PromptEncoder:
    """Text, token ids or chat messages -> a checked `Prompt`, the same for every entry point.

    `processor` is the image processor of a vision-language model (None: images are refused, saying
    `no_images`, by default that `model_name` is text-only); `max_len` the KV-cache positions a sequence has."""

    def __init__(self, tokenizer: NLDTokenizer, config: NLDConfig, max_len: int, model_name: str,
                 processor: ImageProcessor | None = None, no_images: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_len = max_len
        self.processor = processor
        self.no_images = no_images or text_only(model_name)
        self.image_tokens = ImageTokens.lookup(tokenizer, model_name) if config.is_vlm else None
        self.thinking = thinking_tokens(tokenizer)

    def limit_images(self, max_bytes: int, max_pixels: int) -> None:
        """A deployment's caps on one image: encoded bytes, decoded pixels (the serving protocol counts images)."""
        from dataclasses import replace

        from .vision.processor import ImageProcessor

        if self.processor is not None:
            self.processor = ImageProcessor(replace(self.processor.config, max_bytes=max_bytes, max_pixels=max_pixels))

    # the entry points ------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | list[dict], *, chat: bool = True, template_kwargs: dict | None = None,
               local_files: bool, field: str = "the prompt") -> Prompt:
        """A text prompt (through the chat template unless `chat` is false), token ids, or a conversation (a list
        of {"role", "content"} messages whose content is text or a list of text and image parts)."""
        if isinstance(prompt, str):
            return self.text(prompt, chat=chat, template_kwargs=template_kwargs, field=field)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.messages(prompt, template_kwargs=template_kwargs, local_files=local_files,
                                 field="messages" if field == "the prompt" else field)
        if isinstance(prompt, (list, tuple)):
            return self.token_ids(prompt, field=field)
        raise GenerationError(f"a prompt must be a string, a list of token ids or a list of chat messages, "
                              f"got {type(prompt).__name__}")

    def text(self, text: str, *, chat: bool = True, template_kwargs: dict | None = None,
             field: str = "the prompt") -> Prompt:
        if not isinstance(text, str):
            raise GenerationError(f"{field} must be a string, got {type(text).__name__}")
        if not text:
            raise GenerationError(f"{field} is empty: send some text")
        if chat and self.tokenizer.chat_template:
            return self.messages([{"role": "user", "content": text}], template_kwargs=template_kwargs, local_files=False,
                                 field=field)
        return self._checked(self.tokenizer.encode(text), field)

    def token_ids(self, ids: Sequence[Any], field: str = "the prompt") -> Prompt:
        ids = list(ids)
        if len(ids) > self.max_len:
            raise GenerationError(f"{field} holds {len(ids)} tokens, more than the {self.max_len} KV-cache positions")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.config.vocab_size:
                raise GenerationError(f"{field} must be token ids in [0, {self.config.vocab_size}), got {t!r} "
                                      "(outside the vocabulary)")
        return self._checked(ids, field)

    def messages(self, messages: Any, *, template_kwargs: dict | None = None, local_files: bool,
                 field: str = "messages", add_generation_prompt: bool = True) -> Prompt:
        """A conversation through the chat template (with a generation prompt unless `add_generation_prompt` is
        false: a finished conversation, as training renders one). Image parts ({"type": "image", "image": PIL
        image | bytes | data URL | path} or {"type": "image_url", "image_url": {"url": ...}}) are prepared and
        expanded; a path is read only with `local_files` (never for a served request)."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
                for m in messages):
            raise GenerationError(f'{field} must be a non-empty JSON list of {{"role": ..., "content": ...}} (content: '
                                  'a string or a list of parts)')
        rendered, images = [], []
        for i, m in enumerate(messages):
            content = m["content"]
            if isinstance(content, str):
                rendered.append(m)
                continue
            parts = []
            for j, part in enumerate(content):
                where = f"{field}[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in IMAGE_PART_TYPES:
                    images.append(self._image(part, where, local_files))
                    parts.append({"type": "image"})
                else:
                    raise GenerationError(f'{where}: a content part must be {{"type": "text", "text": ...}}, '
                                          '{"type": "image", "image": ...} or {"type": "image_url", "image_url": '
                                          f'{{"url": ...}}}}, got {_short(part)}')
            if self.processor is None:  # a text model's template takes text content: the parts, joined
                rendered.append({**m, "content": "\n".join(p["text"] for p in parts)})
            else:
                rendered.append({**m, "content": parts})
        return self._templated(rendered, images, template_kwargs, field, add_generation_prompt)

    def with_images(self, prompt: str | Sequence[int], images: Sequence[tuple[str, Any]], *, chat: bool = True,
                    template_kwargs: dict | None = None, field: str = "text_input") -> Prompt:
        """A text prompt (one user turn through the chat template unless `chat` is false) or token ids, with one or
        more images given apart: (where, value) pairs, the value anything `ImageProcessor.load` takes from a served
        request. The prompt holds the image marker (`<|image_start|>`) once where each image goes, or none: the
        images then come first (TensorRT-LLM's convention for Pixtral's `[IMG]`)."""
        if self.processor is None:
            raise GenerationError(f"{images[0][0]}: {self.no_images}")
        prepared = [self._fits(self.processor.load(value, where, local_files=False), where) for where, value in images]
        if not isinstance(prompt, str):  # token ids: their <|image_start|> tokens mark the places
            ids = list(prompt)
            if self.image_tokens.start not in ids:
                ids = [self.image_tokens.start] * len(images) + ids
            return self._expanded(self.token_ids(ids, field).ids, prepared, field)
        if not prompt:
            raise GenerationError(f"{field} is empty: send some text")
        from .vision.config import IMAGE_TOKEN_NAMES

        marker = IMAGE_TOKEN_NAMES["start"]
        pieces = prompt.split(marker)
        if len(pieces) == 1:
            pieces = [""] * len(images) + pieces
        elif len(pieces) - 1 != len(images):
            raise GenerationError(f"{field} holds {len(pieces) - 1} image markers ({marker}) for {len(images)} images: "
                                  "put one where each image goes, or none (the images then come first)")
        if not (chat and self.tokenizer.chat_template):
            return self._expanded(self.tokenizer.encode(marker.join(pieces)), prepared, field)
        content: list[dict] = []
        for i, piece in enumerate(pieces):
            if piece:
                content.append({"type": "text", "text": piece})
            if i < len(images):
                content.append({"type": "image"})
        return self._templated([{"role": "user", "content": content}], prepared, template_kwargs, field)

    # the pieces ------------------------------------------------------------------------------------
    def _templated(self, rendered: list[dict], images: list[PreparedImage], template_kwargs: dict | None,
                   field: str, add_generation_prompt: bool = True) -> Prompt:
        text = self.tokenizer.apply_chat_template(rendered, **{"add_generation_prompt": add_generation_prompt,
                                                               **(template_kwargs or {})})
        return self._expanded(self.tokenizer.encode(text, add_special_tokens=False), images, field)

    def _image(self, part: dict, where: str, local_files: bool) -> PreparedImage:
        if self.processor is None:
            raise GenerationError(f"{where}: {self.no_images}")
        if part["type"] == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise GenerationError(f'{where}: an image_url part needs {{"image_url": {{"url": "data:image/...;base64,'
                                      f'..."}}}}, got {_short(part)}')
            value = url
        else:
            present = [k for k in ("image", "url", "path") if part.get(k) is not None]
            if len(present) != 1:
                raise GenerationError(f'{where}: an image part needs exactly one of "image", "url" or "path", got '
                                      f"{_short(part)}")
            value = part[present[0]]
        return self._fits(self.processor.load(value, where, local_files=local_files), where)

    def _fits(self, prepared: PreparedImage, where: str) -> PreparedImage:
        if prepared.positions > self.max_len:
            rows, cols = prepared.grid
            raise GenerationError(f"{where}: the image ({prepared.source_size[0]} x {prepared.source_size[1]} pixels, "
                                  f"{rows} x {cols} cells) needs {prepared.positions} prompt positions, more than the "
                                  f"{self.max_len} KV-cache positions a sequence has: send a smaller image or load "
                                  "with a larger max_seq_len")
        return prepared

    def _expanded(self, ids: list[int], images: list[PreparedImage], field: str) -> Prompt:
        """Replace each `<|image_start|>` the template wrote by its image's full expansion."""
        if self.image_tokens is None:
            return self._checked(ids, field)
        self._no_pads(ids, field)  # pads come only from the expansion below
        marks = [i for i, t in enumerate(ids) if t == self.image_tokens.start]
        if len(marks) != len(images):
            raise GenerationError(f"{field}: the chat template wrote {len(marks)} image markers for {len(images)} "
                                  "images (is an image token in the text, or does the template drop image parts?)")
        out: list[int] = []
        spans = []
        last = 0
        for mark, image in zip(marks, images):
            out += ids[last:mark]
            start = len(out)
            out += self.image_tokens.expand(image.grid)
            spans.append(ImageSpan(start, len(out), image.digest, image.grid))
            last = mark + 1
        out += ids[last:]
        prompt = self._checked(out, field, images_allowed=True)
        prompt.images, prompt.pixels = tuple(spans), tuple(images)
        return prompt

    def _checked(self, ids: list[int], field: str, images_allowed: bool = False) -> Prompt:
        if not ids:
            raise GenerationError(f"{field} is empty: give at least one token (it encodes to no tokens)")
        if not images_allowed:
            self._no_pads(ids, field)
        return Prompt(ids, thinking=self._opens_thinking(ids))

    def _no_pads(self, ids: list[int], field: str) -> None:
        """A pad position stands for an image's row: only an image part may put one in a prompt."""
        if self.image_tokens is not None and self.image_tokens.pad in ids:
            at = ids.index(self.image_tokens.pad)
            raise GenerationError(f"{field}: token {self.image_tokens.pad} (<|image_pad|>) at position {at} stands for "
                                  "an image's rows: send the image as an image content part of a chat message")

    def _opens_thinking(self, ids: list[int]) -> bool:
        """Whether the prompt ends by opening a thought (the open-think token, then at most whitespace)."""
        if self.thinking is None:
            return False
        for t in reversed(ids):
            if t == self.thinking[0]:
                return True
            if self.tokenizer.token_text(t).strip():
                return False
        return False


def text_only(model_name: str) -> str:
    """Why a text model refuses images."""
    return (f"{model_name} is a text-only model: it cannot take images (it has no vision tower; a "
            "Nemotron-Labs-Diffusion-VLM checkpoint has one)")


def engine_text_only(model_name: str, reason: str) -> str:
    """Why an engine build of a vision-language model refuses images; `reason`: what the build lacks
    (nld_trt/engine/loader.py, `image_refusal`)."""
    return (f"{model_name} is an engine build that takes text prompts only: {reason}; rebuild it with this "
            "nld-trt (nld-trt build) to take images, or serve the checkpoint")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
