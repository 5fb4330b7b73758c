"""Calibration and held-out data: records, their tokens, and the forward passes calibration runs.

NLD runs one network under two attention patterns, so calibration must show the quantizers both: causal
passes over prompt + answer (the prefill, `ar`, the `linear_spec` verify pass) and block passes as the
diffusion drafts see them: a causal context followed by a block of B tokens that attend to each other
bidirectionally, either the `linear_spec` draft `[t, MASK x (B-1)]` (with the LoRA drafter when the
checkpoint has one) or a partly masked `dlm` block. `block_mix` is the share of block passes.

Each pass is cache-free, batch 1 (no padding rows to skew activation ranges), with the exact mask a cached
pass would see, built by `nld_trt.attention.chunk_attention_mask`.

A vision-language checkpoint is also calibrated on image prompts (`image_passes`): a user turn with an image
and a question, its image rows (the projector's output, which can be far from text embeddings in range) at
the pad positions, then an answer; causal passes and draft passes after the image. The images are the
user's (`--calib-images DIR`) or built-in synthetic pictures of coloured shapes whose answers describe them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from ..attention import chunk_attention_mask
from ..fileutil import read_jsonl_rows
from . import QuantizationError

CALIB_SEED = 7_777  # the built-in calibration stream; the evaluation set has its own seed
KINDS = ("causal", "draft", "denoise")

# Used only when nld_trt.training.data (the GSM-style generator) is not available.
FALLBACK_PROBLEMS = [
    (
        "Tom has 12 apples. He gives 5 apples to Ann. How many apples does Tom have left?",
        "Tom has 12 - 5 = 7 apples left. The answer is \\boxed{7}.",
    ),
    (
        "A pack holds 6 pens. Sara buys 4 packs. How many pens does she have?",
        "Sara has 6 * 4 = 24 pens. The answer is \\boxed{24}.",
    ),
    (
        "Ben reads 9 pages every day for 5 days. How many pages does he read?",
        "Ben reads 9 * 5 = 45 pages. The answer is \\boxed{45}.",
    ),
    (
        "Mia has 17 stickers and buys 25 more. How many stickers does she have?",
        "Mia has 17 + 25 = 42 stickers. The answer is \\boxed{42}.",
    ),
    (
        "A box has 8 eggs. Leo buys 3 boxes and breaks 2 eggs. How many eggs are left?",
        "Leo buys 8 * 3 = 24 eggs. After breaking 2, 24 - 2 = 22 eggs are left. The answer is \\boxed{22}.",
    ),
    (
        "Zoe saves 15 dollars a week for 4 weeks and spends 20. How many dollars are left?",
        "Zoe saves 15 * 4 = 60 dollars. After spending 20, 60 - 20 = 40 dollars are left. The answer is \\boxed{40}.",
    ),
    (
        "Omar has 30 cards and shares them equally among 5 friends. How many cards does each friend get?",
        "Each friend gets 30 / 5 = 6 cards. The answer is \\boxed{6}.",
    ),
    (
        "Ivy buys 3 books for $7 each. She pays with a $50 bill. How much change does she get?",
        "The books cost 3 * 7 = 21 dollars. The change is 50 - 21 = 29 dollars. The answer is \\boxed{29}.",
    ),
]


@dataclass(frozen=True)
class Record:
    """One text: a question with its answer (chat-formatted prompt + continuation), or plain text."""

    text: str | None = None
    question: str | None = None
    answer: str | None = None

    @property
    def gold(self) -> str | None:
        """The reference final answer: the last \\boxed{...} or a GSM8K `#### N` line."""
        return extract_answer(self.answer) if self.answer is not None else None


def extract_answer(text: str) -> str | None:
    """A final answer (last \\boxed{} or `#### N`); the fallback when nld_trt.evaluate is absent."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return _normalize(boxed[-1])
    m = re.search(r"####\s*(.+?)\s*$", text.strip())
    return _normalize(m.group(1)) if m else None


def _normalize(answer: str) -> str:
    return answer.strip().replace(",", "").replace("$", "").rstrip(".")


# Sources ------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, what: str = "calibration") -> list[Record]:
    """Records of a JSONL file: each line an object with `text`, or `question` and `answer`."""
    rows = read_jsonl_rows(path, what, QuantizationError)
    records = [_record(obj, where) for where, obj in rows]
    if not records:
        raise QuantizationError(
            f"{what} file {path} is empty: it needs one JSON object per line with a `text` field, "
            "or `question` and `answer` fields"
        )
    return records


def _record(obj: object, where: str) -> Record:
    def text_field(name: str) -> str | None:
        v = obj.get(name)  # type: ignore[union-attr]
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise QuantizationError(f"{where}: `{name}` must be a non-empty string, found {v!r}")
        return v

    if not isinstance(obj, dict):
        raise QuantizationError(f"{where}: each line must be a JSON object, found {type(obj).__name__}")
    text, question, answer = text_field("text"), text_field("question"), text_field("answer")
    if question is not None and answer is not None:
        return Record(question=question, answer=answer)
    if text is not None:
        return Record(text=text)
    raise QuantizationError(f"{where}: needs a `text` field, or both `question` and `answer` (found {sorted(obj)})")


def _problem_stream(seed: int, exclude: Iterable[str] = ()) -> Iterable[Record]:
    try:
        from ..training import data
    except ImportError:
        rng = random.Random(seed)
        while True:
            q, a = rng.choice(FALLBACK_PROBLEMS)
            yield Record(question=q, answer=a)
    for p in data.generate(seed, exclude=exclude):
        yield Record(question=p.question, answer=p.answer)


def evaluation_records(size: int) -> list[Record]:
    """The held-out set: the evaluation set of nld_trt.training.data (the built-in problems without it)."""
    try:
        from ..training import data
    except ImportError:
        return [Record(question=q, answer=a) for q, a in FALLBACK_PROBLEMS[:size]]
    return [Record(question=p.question, answer=p.answer) for p in data.evaluation_set(size=size)]


def calibration_records(size: int, path: str | Path | None = None) -> list[Record]:
    """The calibration texts: the file's, or built-in GSM-style problems disjoint from the evaluation set."""
    if path is not None:
        return read_jsonl(path)
    try:
        from ..training import data

        exclude = [p.question for p in data.evaluation_set()]
    except ImportError:
        exclude = []
    return list(islice(_problem_stream(CALIB_SEED, exclude), size))


# Tokens -------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, question: str) -> list[int]:
    """A user turn through the chat template with the generation prompt (raw text without a template)."""
    if tokenizer.chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": question}])
    return tokenizer.encode(question)


def encode_record(record: Record, tokenizer, eos_id: int | None) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids): a question's chat prompt and its answer + EOS, or [] and the text."""
    if record.question is not None:
        answer = tokenizer.encode(record.answer, add_special_tokens=False)
        return encode_prompt(tokenizer, record.question), answer + ([eos_id] if eos_id is not None else [])
    return [], tokenizer.encode(record.text)


# Passes -------------------------------------------------------------------------------------------
def pass_mask(context: int, chunk: int, block: bool) -> torch.Tensor:
    """[1, 1, T, T] mask of a cache-free pass over context + chunk that sees what a cached pass would:
    the context causally, the chunk after it causally or (block) bidirectionally."""
    total = context + chunk
    zero, one = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool)
    rows = [chunk_attention_mask(torch.tensor([context]), torch.tensor([chunk]), one if block else ~one, chunk, total)]
    if context:
        rows.insert(0, chunk_attention_mask(zero, torch.tensor([context]), ~one, context, total))
    return torch.cat(rows, dim=2)


@dataclass(frozen=True)
class CalibPass:
    kind: str  # causal | draft (linear_spec draft, LoRA on) | denoise (dlm block, partly masked)
    tokens: tuple[int, ...]
    context: int  # causal prefix length; the chunk is the rest
    lora: bool = False
    # image prompts: (positions, rows [n, hidden]) replacing those positions' token embeddings
    embeds: tuple[tuple[int, ...], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def embedded(self, model, tokens: torch.Tensor) -> torch.Tensor | None:
        """The pass's input embeddings when it has image rows (None: the model embeds the tokens itself)."""
        if self.embeds is None:
            return None
        x = model.embed(tokens).clone()
        positions, rows = self.embeds
        x[0, list(positions)] = rows.to(x.device, x.dtype)
        return x

    def inputs(self, device: str | torch.device = "cpu"):
        """(tokens, positions, mask, lora_rows) for NLDModel.forward."""
        t = len(self.tokens)
        tokens = torch.tensor([self.tokens], dtype=torch.long, device=device)
        positions = torch.arange(t, device=device)[None]
        mask = pass_mask(self.context, t - self.context, self.kind != "causal").to(device)
        lora_rows = None
        if self.lora:
            lora_rows = (torch.arange(t, device=device) >= self.context)[None]
        return tokens, positions, mask, lora_rows


def build_passes(
    texts: list[tuple[list[int], list[int]]],
    size: int,
    seq_len: int,
    block_mix: float,
    block_length: int,
    mask_id: int,
    lora: bool,
    seed: int = 0,
) -> list[CalibPass]:
    """`size` passes, round(size * block_mix) of them block passes (alternately draft and denoise)."""
    usable = [p + a for p, a in texts if len(p + a) >= 2]
    starts = [len(p) for p, a in texts if len(p + a) >= 2]
    if not usable:
        raise QuantizationError("no calibration text has two or more tokens")
    rng = random.Random(seed)
    n_block = round(size * block_mix)
    passes = [CalibPass("causal", tuple(usable[i % len(usable)][:seq_len]), 0) for i in range(size - n_block)]
    b = block_length
    for i in range(n_block):
        j = (i + size - n_block) % len(usable)
        full, answer_start = usable[j], starts[j]
        hi = max(1, min(len(full) - 1, seq_len - b))
        lo = min(max(1, answer_start), hi)
        kind = "draft" if i % 2 == 0 else "denoise"
        if kind == "draft":
            s = rng.randint(lo, hi)
            chunk = [full[s]] + [mask_id] * (b - 1)
        else:  # block-aligned from the answer's start, as dlm decodes
            s = lo + b * rng.randint(0, (hi - lo) // b)
            chunk = (full[s : s + b] + [mask_id] * b)[:b]
            hidden = rng.sample(range(1, b), max(1, round(rng.uniform(0.1, 1.0) * (b - 1)))) if b > 1 else []
            for k in hidden:
                chunk[k] = mask_id
        passes.append(CalibPass(kind, tuple(full[:s] + chunk), s, lora and kind == "draft"))
    return passes


# Images (vision-language checkpoints) ------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((224, 224), (336, 224), (224, 308), (280, 280), (392, 252))


@dataclass(frozen=True)
class ImageRecord:
    image: object  # a PIL image or a file path
    question: str
    answer: str


def synthetic_images(n: int, seed: int = CALIB_SEED) -> list[ImageRecord]:
    """Seeded pictures of one to three coloured shapes on a plain background, each with a question and an
    answer that describes it (so the answer tokens follow the image as a real answer would)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        background = rng.choice(names)
        image = Image.new("RGB", (w, h), COLOURS[background])
        draw = ImageDraw.Draw(image)
        said = []
        for _ in range(rng.randint(1, 3)):
            colour = rng.choice([c for c in names if c != background])
            shape = rng.choice(SHAPES)
            r = rng.randint(min(w, h) // 8, min(w, h) // 4)
            x, y = rng.randint(r, w - r), rng.randint(r, h - r)
            box = (x - r, y - r, x + r, y + r)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
            said.append(f"a {colour} {shape}")
        shapes = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
        question = rng.choice(("Describe this image.", "What do you see in the picture?",
                               "Which shapes and colours are in this image?"))
        out.append(ImageRecord(image, question, f"The image shows {shapes} on a {background} background."))
    return out


def image_records(n: int, directory: str | Path | None = None) -> list[ImageRecord]:
    """`n` image records: the directory's images (cycled, each asked to be described), or synthetic ones."""
    if directory is None:
        return synthetic_images(n)
    root = Path(directory)
    if not root.is_dir():
        raise QuantizationError(f"--calib-images {root} is not a directory")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise QuantizationError(f"--calib-images {root} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return [ImageRecord(files[i % len(files)], "Describe this image.", "The image shows") for i in range(n)]


def image_passes(
    prompts: list[tuple[list[int], list[int], torch.Tensor, list[int]]],
    size: int,
    seq_len: int,
    block_mix: float,
    block_length: int,
    mask_id: int,
    lora: bool,
    seed: int = 0,
) -> list[CalibPass]:
    """`size` passes over image prompts: (prompt ids, pad positions, image rows, answer ids) each. Causal
    passes over prompt + answer, and round(size * block_mix) draft passes right after the image's prompt."""
    rng = random.Random(seed + 1)
    n_block = round(size * block_mix)
    passes = []
    for i in range(size):
        ids, pads, rows, answer = prompts[i % len(prompts)]
        full = (ids + answer)[:seq_len]
        keep = [k for k, p in enumerate(pads) if p < len(full)]
        embeds = (tuple(pads[k] for k in keep), rows[keep])
        if i < size - n_block or len(full) <= len(ids) or len(ids) + block_length > seq_len:
            passes.append(CalibPass("causal", tuple(full), 0, embeds=embeds))
            continue
        s = rng.randint(len(ids), min(len(ids + answer), seq_len - block_length + 1) - 1)
        chunk = [full[s] if s < len(full) else mask_id] + [mask_id] * (block_length - 1)
        passes.append(CalibPass("draft", tuple(full[:s] + chunk), s, lora, embeds=embeds))
    return passes
