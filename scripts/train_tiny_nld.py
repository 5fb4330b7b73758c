#!/usr/bin/env python
"""Train the embedded default models (`nld_trt/assets/tiny-nld`, and with `--vlm` `nld_trt/assets/tiny-nld-vlm`)
on a CPU, reproducibly.

The data are conversations (`nld_trt.training.data.conversations`): seeded synthetic GSM-style problems, a
share of them alone and the rest as 2 to 5 question / answer turns, some opening with a system prompt, some
asking a follow-up about the previous answer. Each is rendered through the checkpoint's own chat template
exactly as serving renders a conversation (`data.render`), and every assistant turn carries the loss.
Phase 1 trains the whole model on NLD's joint objective (AR loss on a clean copy + block-diffusion loss on
a noisy copy, one pass; `nld_trt.training.objective`), with a block size drawn per batch so every block
length works at inference. Phase 2 freezes the model and trains the `linear_spec_lora/` draft adapter
(o_proj, rank 16) on mostly fully masked drafts. The result is written in the release layout with
`nld_trt.checkpoint.save_checkpoint`, plus `training_summary.json`.

    python scripts/train_tiny_nld.py --out nld_trt/assets/tiny-nld           # the full recipe (about an hour)
    python scripts/train_tiny_nld.py --tiny --out /tmp/t                     # seconds, for CI
    python scripts/train_tiny_nld.py --vlm --out nld_trt/assets/tiny-nld-vlm  # the tiny VLM (about an hour)
    python scripts/train_tiny_nld.py --vlm --tiny --out /tmp/v               # seconds, for CI

`--vlm` trains the vision-language model with the same recipe: the same objective, schedule, drafter and
rendering, on conversations about seeded synthetic pictures (`nld_trt.training.pictures`: shapes, colours,
counts, positions, seven-segment digits, bar charts; follow-ups about the same picture; a share of text-only
arithmetic conversations). A user turn's image parts are expanded by the checkpoint's own prompt encoder as
serving expands them, and the rows of a small Pixtral tower + Mistral 3 projector (trained from scratch with
the backbone) replace the image's pad embeddings. The tokenizer has the VLM layout (ChatML, `<|im_end|>` as EOS,
the image tokens 18-21) and `preprocessor_config.json` caps the longest edge at `--longest-edge` pixels, so a
picture is a few dozen positions. The drafter phase freezes the tower too.

`--init-from TEXT_MODEL` (with `--vlm`) starts the backbone from a trained text checkpoint of this recipe (the
embedded `nld_trt/assets/tiny-nld`): its weights, shape and tokenizer (the same BPE, the VLM layout's special
tokens at the same ids: `nld_trt.tiny.with_vlm_specials`), so what it knows (the answer format, copying from
the question, arithmetic) carries over and the budget goes to seeing; the tower and projector start from
scratch at `--lr`, the backbone at `--lr` x `--backbone-lr-scale`. The summary records the text model's digest.
`--weights-from VLM` then loads a VLM this recipe trained (backbone, tower and projector; the probe starts
afresh) and trains it on a new schedule: a second stage, whose summary records the first's digest.
`--look-weight W` (with `--vlm`) adds W x the look loss (`nld_trt.training.objective.look_loss`): where a
position answer writes a shape's rank, one head of `--look-layer` should attend to that shape's cells. Without it
no head looked there and position answers stayed at chance (README, "The embedded tiny VLM").

The schedule is fixed in steps (`--steps`, `--lora-steps`), so the weights do not depend on how busy the
machine is; `--time-budget` is only a safety cap (each phase then anneals early rather than run over, and
the summary says so). Batches are sized in tokens (`--batch-tokens`: clean-copy slots per step, padding
included), from length-sorted pools of conversations, so every step costs about the same whatever its
conversations' lengths.

Both cores by data parallelism: `--workers 2` processes of one thread each (torch.distributed, gloo,
gradients averaged every step) train at about twice the rate of one, whereas two threads in one process
train 3-8x slower on this machine kind (shared/recipes). Precision `auto`: bf16
autocast where the CPU has AVX512-BF16 or AMX (about 1.4x faster per step there), float32 elsewhere (on
AVX2-only CPUs, like some of our AMD EPYC hosts, bf16 matmuls run about 35x slower than float32).
Same seed, same workers and no time cap hit -> the same weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nld_trt.checkpoint import LoRAAdapter, load_weights, save_checkpoint
from nld_trt.config import VLM_MODEL_TYPE, NLDConfig, RopeConfig
from nld_trt.model import NLDModel, init_weights, norm_weights
from nld_trt.prompt import PromptEncoder
from nld_trt.tiny import (BOS_ID, EOS_ID, MASK_ID, PAD_ID, VLM_EOS_ID, VLM_SPECIAL_TOKENS, tokenizer_files,
                          train_tokenizer, with_vlm_specials)
from nld_trt.tokenizer import NLDTokenizer
from nld_trt.training import data, pictures
from nld_trt.training.objective import Example, ExampleImage, MaskSchedule, draft_loss, joint_loss, make_batch
from nld_trt.vision.config import VisionConfig, VLMConfig
from nld_trt.vision.processor import PREPROCESSOR_FILE, ImageProcessor, ProcessorConfig
from nld_trt.vision.tower import VisionEncoder

TOKENIZER_SAMPLES = 50_000
# The full recipe's schedule (see the README's training section for how they were chosen).
STEPS, LORA_STEPS, BATCH_TOKENS = 4900, 650, 3840
VLM_STEPS, VLM_LORA_STEPS = 4000, 500  # --vlm (see the README's tiny VLM section)
# --init-from: rows of the VLM layout's tokens seeded from the text model's: <|im_start|> (every conversation's
# first token) from <s>, <|im_end|> (EOS) from </s>. Without a BOS the text model loses the attention sink it
# built on <s>, and a VLM started from it made one of the picture instead: text after an image put 40-48% of its
# attention on the image positions, whose rows had all become one large constant vector (the picture unread).
SEEDED_ROWS = {10: BOS_ID, VLM_EOS_ID: EOS_ID}
PAD_TO = 32  # batch shapes in multiples of 32 slots (see objective.make_batch)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to write (replaced if it exists)")
    ap.add_argument("--vlm", action="store_true",
                    help="train the tiny vision-language model on synthetic pictures (see above)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"phase-1 steps (joint objective) [default: {STEPS}, with --vlm {VLM_STEPS}]")
    ap.add_argument("--lora-steps", type=int, default=None,
                    help=f"phase-2 steps (draft adapter) [default: {LORA_STEPS}, with --vlm {VLM_LORA_STEPS}]")
    ap.add_argument("--time-budget", type=float, default=240.0,
                    help="safety cap in minutes for the whole run: a phase that would run over anneals early")
    ap.add_argument("--lora-share", type=float, default=0.1, help="share of the time cap kept for phase 2")
    ap.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                    help="clean-copy token slots per step (rows x longest row, padding included), split among the workers")
    ap.add_argument("--p-single", type=float, default=None,
                    help=f"share of conversations that are one question [default: {data.ConversationMix.p_single}; text model only]")
    ap.add_argument("--max-history", type=int, default=None,
                    help=f"most question / answer turns before the last question [default: {data.ConversationMix.max_history}; text model only]")
    ap.add_argument("--p-followup", type=float, default=None,
                    help=f"chance that a question is followed by a follow-up about it [default: {data.ConversationMix.p_followup}; text model only]")
    ap.add_argument("--p-system", type=float, default=None,
                    help=f"share of conversations opening with a system prompt [default: {data.ConversationMix.p_system}; text model only]")
    ap.add_argument("--loss-on", choices=("all", "last"), default="all",
                    help="which assistant turns carry the loss")
    ap.add_argument("--p-text", type=float, default=pictures.PictureMix.p_text,
                    help="--vlm: share of text-only (arithmetic) conversations")
    ap.add_argument("--vision-hidden", type=int, default=128, help="--vlm: the tower's width")
    ap.add_argument("--vision-layers", type=int, default=3, help="--vlm: the tower's layers")
    ap.add_argument("--vision-heads", type=int, default=4, help="--vlm: the tower's attention heads")
    ap.add_argument("--vision-intermediate", type=int, default=384, help="--vlm: the tower's FFN width")
    ap.add_argument("--longest-edge", type=int, default=224,
                    help="--vlm: the processor's longest-edge cap in pixels (224: at most 8 x 8 image tokens)")
    ap.add_argument("--probe-weight", type=float, default=1.0,
                    help="--vlm: weight of the auxiliary per-cell probe's loss (0: no probe)")
    ap.add_argument("--look-weight", type=float, default=0.0,
                    help="--vlm: weight of the look loss (objective.look_loss: where an answer states a shape's "
                         "rank, a head of --look-layer attends to that shape's cells; 0: off)")
    ap.add_argument("--look-layer", type=int, default=2, help="--vlm: the backbone layer the look loss trains")
    ap.add_argument("--weights-from", default=None,
                    help="with --vlm: continue this trained VLM of the same shape (its backbone, tower and projector) "
                         "on a new schedule (see above)")
    ap.add_argument("--init-from", default=None,
                    help="--vlm: a text checkpoint of this recipe to start the backbone from (its shape and tokenizer)")
    ap.add_argument("--backbone-lr-scale", type=float, default=1 / 3,
                    help="with --init-from: the backbone's peak learning rate as a share of --lr")
    ap.add_argument("--workers", type=int, default=2, help="data-parallel processes, one thread each")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--block-sizes", default="4,8,16,32,32", help="drawn uniformly per batch")
    ap.add_argument("--dlm-weight", type=float, default=1.0,
                    help="weight of the block-diffusion loss against the AR loss in phase 1")
    ap.add_argument("--p-full", type=float, default=0.4, help="share of blocks with all but the first masked")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=2048, help="BPE target size (the config rounds up to 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=0,
                    help="also write the weights every N phase-1 steps to OUT.step-N (no drafter yet), to evaluate "
                         "a long run early; 0: never")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="bf16: autocast; auto: bf16 where the CPU has native bf16 (see above)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI): tiny model, few steps")
    args = ap.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if args.init_from is not None:
        if not args.vlm:
            ap.error("--init-from starts a VLM from a text model: it needs --vlm")
        base = NLDConfig.from_file(args.init_from)
        if base.is_vlm:
            ap.error(f"--init-from {args.init_from} is a vision-language checkpoint; give a text model")
        # the text model's shape is the backbone's
        args.hidden, args.layers, args.heads, args.kv_heads = (base.hidden_size, base.num_hidden_layers,
                                                               base.num_attention_heads, base.num_key_value_heads)
        args.head_dim, args.intermediate = base.head_dim, base.intermediate_size
    if args.weights_from is not None:
        if not args.vlm:
            ap.error("--weights-from continues a vision-language model: it needs --vlm")
        if not NLDConfig.from_file(args.weights_from).is_vlm:
            ap.error(f"--weights-from {args.weights_from} is a text checkpoint; give a VLM of this recipe")
    if args.look_weight < 0:
        ap.error(f"--look-weight must be >= 0 (0: off), got {args.look_weight}")
    if args.look_weight > 0 and not args.vlm:
        ap.error("--look-weight trains where a vision-language model looks at its pictures: it needs --vlm")
    if args.workers < 1 or args.batch_tokens < args.workers:
        ap.error(f"--workers must be >= 1 and --batch-tokens >= --workers (got {args.workers} and {args.batch_tokens})")
    text_mix = {"p_single": "--p-single", "max_history": "--max-history", "p_followup": "--p-followup",
                "p_system": "--p-system"}
    if args.vlm:  # the VLM's conversations have their own shape (pictures.PictureMix); say so rather than ignore them
        given = [flag for name, flag in text_mix.items() if getattr(args, name) is not None]
        if given:
            ap.error(f"{', '.join(given)} shape the text model's conversations; --vlm draws its own mix "
                     "(nld_trt.training.pictures.PictureMix; --p-text sets its text-only share)")
    for name in text_mix:
        if getattr(args, name) is None:
            setattr(args, name, getattr(data.ConversationMix, name))
    if args.steps is None:
        args.steps = VLM_STEPS if args.vlm else STEPS
    if args.lora_steps is None:
        args.lora_steps = VLM_LORA_STEPS if args.vlm else LORA_STEPS
    if args.tiny:
        args.steps, args.lora_steps, args.batch_tokens = 6, 3, 600 * args.workers
        if args.init_from is None:
            args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim, args.intermediate = 64, 2, 2, 1, 32, 128
        args.vocab, args.lora_rank, args.log_every = 512, 4, 2
        args.vision_hidden, args.vision_layers, args.vision_heads, args.vision_intermediate = 32, 1, 2, 64
    if args.look_weight > 0 and not 0 <= args.look_layer < args.layers:
        ap.error(f"--look-layer {args.look_layer} is not a layer of a {args.layers}-layer backbone "
                 f"(0 to {args.layers - 1})")
    return args


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_config(args: argparse.Namespace, vocab_size: int) -> NLDConfig:
    """The release config shape: YaRN with the Ministral-3 query scale, mask id 100, llada alignment.

    max_position_embeddings = factor * original_max_position_embeddings, as YaRN expects (transformers
    warns otherwise); the query scale is active from position 256, so long prompts exercise it."""
    rope = RopeConfig(
        rope_type="yarn", rope_theta=1_000_000.0, factor=16.0, original_max_position_embeddings=256,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1,
    )
    return NLDConfig(
        vocab_size=-(-vocab_size // 128) * 128, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, mask_token_id=MASK_ID, rope=rope, max_position_embeddings=4096,
        bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID, block_size=32, dlm_type="llada",
        torch_dtype="bfloat16",
    )


def vlm_config(args: argparse.Namespace, vocab_size: int) -> VLMConfig:
    """The text model of `model_config` (or --init-from's) with the VLM layout's EOS (<|im_end|>) and no pad token,
    a small Pixtral tower (the release's patch 14, silu) and the Mistral 3 projector (2 x 2 merge, gelu, no bias)."""
    from dataclasses import replace

    base = model_config(args, vocab_size) if args.init_from is None else NLDConfig.from_file(args.init_from)
    text = replace(base, model_type=VLM_MODEL_TYPE, eos_token_ids=(VLM_EOS_ID,), pad_token_id=None,
                   torch_dtype="bfloat16")
    vision = VisionConfig(hidden_size=args.vision_hidden, intermediate_size=args.vision_intermediate,
                          num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads, patch_size=14,
                          hidden_act="silu", image_size=args.longest_edge)
    return VLMConfig(text=text, vision=vision)


def example(r: data.Rendered, messages: list[dict], tokenizer: NLDTokenizer | None = None) -> Example:
    """A rendered conversation as a training example: with its images' pad positions, pixels and (where the
    image part carries them, as training pictures do) per-cell labels for the auxiliary probe, and the look
    loss's targets of assistant turns that carry `looks` (pictures.Question.looks: the answer token holding
    each given character, and the pads of the given object's cells in the latest picture; `tokenizer` maps the
    characters to tokens)."""
    parts = [part for m in messages if isinstance(m["content"], list) for part in m["content"]
             if part.get("type") in ("image", "image_url")]
    images = []
    for span, image, part in zip(r.images, r.pixels, parts, strict=True):
        cells = part.get("cells")
        if cells is not None:
            if tuple(cells.shape[:2]) != span.grid:
                raise ValueError(f"cell labels of shape {cells.shape} for an image of {span.grid} cells")
            cells = torch.from_numpy(cells.reshape(-1, cells.shape[-1]))
        images.append(ExampleImage(span.pad_positions(), image.pixels, cells))
    looks: list[tuple[int, list[int]]] = []
    seen = -1  # the latest image part so far
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = dict(zip(assistants[len(assistants) - len(r.spans):], r.spans))  # the trained turns' spans
    for i, m in enumerate(messages):
        if isinstance(m["content"], list):
            seen += sum(part.get("type") in ("image", "image_url") for part in m["content"])
        if i not in spans or not m.get("looks"):
            continue
        if tokenizer is None:
            raise ValueError(f"turn {i} has looks: mapping them to tokens needs the tokenizer")
        if seen < 0 or "objects" not in parts[seen]:
            raise ValueError(f"turn {i} has looks but no picture before it carries a cover map ('objects')")
        if tuple(parts[seen]["objects"].shape) != r.images[seen].grid:
            raise ValueError(f"turn {i}: a cover map of shape {parts[seen]['objects'].shape} for an image of "
                             f"{r.images[seen].grid} cells")
        start, end = spans[i]
        if not tokenizer.decode(r.ids[start:end]).startswith(m["content"]):
            raise ValueError(f"turn {i}: its rendered tokens do not start with its answer")
        objects = parts[seen]["objects"].reshape(-1)
        pads = r.images[seen].pad_positions()
        for offset, obj in m["looks"]:
            if not 0 <= offset < len(m["content"]):
                raise ValueError(f"turn {i}: a look at character {offset} of a {len(m['content'])}-character answer")
            # the token holding the character: the first prefix of the answer's tokens that reaches past it
            at = next(start + n - 1 for n in range(1, end - start + 1)
                      if len(tokenizer.decode(r.ids[start:start + n])) > offset)
            keys = [pads[c] for c in range(len(pads)) if objects[c] == obj]
            if keys:  # (a small shape can cover no cell enough to be its cell: nothing to look at)
                looks.append((at, keys))
    return Example(r.ids, r.spans, images, looks)


class Batches:
    """The seeded training conversations (evaluation questions excluded), rendered through the checkpoint's
    chat template, in batches of about `tokens` clean slots: a pool of `pool` conversations is sorted by
    length and cut, so little of each pass is padding and every step costs about the same. Lengths count
    in multiples of `pad_to` (`make_batch` pads to them), so batches come in few shapes. `prompts` (the
    checkpoint's prompt encoder) expands the images of picture conversations as serving does."""

    def __init__(self, tokenizer: NLDTokenizer, stream, tokens: int, loss_on: str, seed: int,
                 prompts: PromptEncoder | None = None, pad_to: int = PAD_TO, pool: int = 256) -> None:
        self.tok, self.loss_on, self.pad_to, self.prompts = tokenizer, loss_on, pad_to, prompts
        self.stream = stream
        self.rng = random.Random(seed)
        self.tokens, self.pool = tokens, pool
        self.ready: list[list[Example]] = []

    def next(self) -> list[Example]:
        if not self.ready:
            conversations = list(itertools.islice(self.stream, self.pool))
            examples = sorted((example(data.render(self.tok, m, self.loss_on, self.prompts), m, self.tok)
                               for m in conversations),
                              key=lambda e: len(e.tokens))
            batch: list[Example] = []
            for e in examples:  # ascending, so the newest example is the longest row
                if batch and (len(batch) + 1) * (-(-len(e.tokens) // self.pad_to) * self.pad_to) > self.tokens:
                    self.ready.append(batch)
                    batch = []
                batch.append(e)
            self.ready.append(batch)
            self.rng.shuffle(self.ready)
        return self.ready.pop()


class RecentImages(ImageProcessor):
    """The image processor, remembering the last few images it prepared: rendering a conversation prepares its
    picture once per turn prefix (`data.render`), the same PIL image each time."""

    def __init__(self, config: ProcessorConfig, keep: int = 64) -> None:
        super().__init__(config)
        self.keep = keep
        self.recent: dict[int, tuple[object, object]] = {}  # id(image) -> (image, prepared): the image held alive

    def prepare(self, image, where: str):
        hit = self.recent.get(id(image))
        if hit is not None and hit[0] is image:
            return hit[1]
        prepared = super().prepare(image, where)
        if len(self.recent) >= self.keep:
            self.recent.pop(next(iter(self.recent)))
        self.recent[id(image)] = (image, prepared)
        return prepared


def prompt_encoder(tokenizer: NLDTokenizer, config: VLMConfig, directory: Path) -> PromptEncoder:
    """The prompt encoder serving builds for the checkpoint in `directory` (its preprocessor_config.json)."""
    processor = RecentImages(ProcessorConfig.from_checkpoint(directory, config.vision.patch_size,
                                                             config.spatial_merge_size))
    return PromptEncoder(tokenizer, config.text, config.text.max_position_embeddings, "the model in training",
                         processor)


def check_rendering(tokenizer: NLDTokenizer, directory: Path, sample: list[dict],
                    prompts: PromptEncoder | None = None) -> None:
    """The written checkpoint renders a training conversation to the very ids the model was trained on."""
    written = NLDTokenizer(directory)
    served = None if prompts is None else prompt_encoder(written, VLMConfig.from_file(directory), directory)
    want, got = data.render(tokenizer, sample, prompts=prompts), data.render(written, sample, prompts=served)
    if want != got:
        raise SystemExit(f"the written checkpoint renders conversations differently from training: {got} != {want}")


def checkpoint_digest(directory: Path) -> dict:
    """What identifies the checkpoint a run started from: the SHA-256 of its weights and tokenizer."""
    import hashlib

    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in ("model.safetensors", "tokenizer.json")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def average_gradients(params: list[torch.Tensor]) -> None:
    """One all-reduce of every gradient, flattened, divided by the number of workers. A parameter this worker's
    batch did not reach (the tower or the probe on a batch without pictures) counts as a zero gradient, so every
    worker reduces the same tensors."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def check_in_sync(params: list[torch.Tensor], phase: str) -> None:
    """Every worker must hold the same weights after a phase (what worker 0 writes stands for all)."""
    sums = torch.stack([p.detach().double().sum() for p in params])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"data-parallel workers diverged in phase {phase}: "
                           f"{int((low != high).sum())} of {len(params)} tensors differ")


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to `floor` * peak; `progress` in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    t = min((progress - warmup) / (1 - warmup), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def orphaned() -> bool:
    """Whether this is a data-parallel worker whose launching process has died. torch's `mp.spawn` has the kernel
    send its workers SIGINT when the launcher dies, but a launcher started in the background (`nohup ... &`) runs
    with SIGINT ignored, its workers too: without this check they would train on for nobody, holding both cores."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def train_phase(name: str, steps: int, seconds: float, step_fn, params, peak_lr: float, log_every: int,
                wd: float, bf16: bool, snapshot=None) -> tuple[list[dict], dict]:
    """Run `step_fn(step) -> (loss tensor, logged dict)` with AdamW for `steps` steps; should the time cap
    `seconds` come first, the schedule follows it instead, so a slow machine still anneals rather than stop
    mid-way. With several workers, gradients are averaged and the slowest clock sets everyone's progress.
    `snapshot(step)`, if given, is called after every step (on every worker: it decides itself whether to write).
    `params`: tensors, or (tensors, learning-rate scale) groups. Returns the log and what ran: steps, seconds, and
    whether the time cap cut the schedule short."""
    groups = params if params and isinstance(params[0], tuple) else [(params, 1.0)]
    params = [t for ts, _ in groups for t in ts]
    opt = torch.optim.AdamW([{"params": ts, "scale": scale} for ts, scale in groups], lr=peak_lr, betas=(0.9, 0.95),
                            weight_decay=wd)
    start = time.perf_counter()
    log: list[dict] = []
    running: dict[str, float] = {}
    step, capped = 0, False
    while True:
        if orphaned():
            raise SystemExit("the trainer that started this worker is gone (killed?): the worker stops too")
        by_time = (time.perf_counter() - start) / seconds
        progress = max(step / steps, by_time)
        if dist.is_initialized():  # every worker takes the same schedule and stops at the same step
            shared = torch.tensor([progress], dtype=torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            progress = float(shared)
        if progress >= 1:
            capped = step < steps
            break
        lr = lr_at(progress, peak_lr)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, logged = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized():
            average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if snapshot is not None:
            snapshot(step)
        for k, v in logged.items():
            running[k] = running.get(k, 0.0) + v
        if step % log_every == 0:
            if is_main():
                means = {k: round(v / log_every, 4) for k, v in running.items()}
                elapsed = time.perf_counter() - start
                log.append({"phase": name, "step": step, "elapsed_s": round(elapsed, 1), "lr": round(lr, 6), **means})
                print(f"[{name}] step {step:5d}  {elapsed:7.1f}s  lr {lr:.2e}  "
                      + "  ".join(f"{k} {v:.4f}" for k, v in means.items()), flush=True)
            running = {}
    if dist.is_initialized():
        check_in_sync(params, name)
    seconds_run = time.perf_counter() - start
    if is_main():
        print(f"[{name}] done: {step} steps in {seconds_run:.1f}s"
              + (f", {dist.get_world_size()} workers in sync" if dist.is_initialized() else "")
              + (f"; the time cap ({seconds:.0f}s) cut it short of {steps} steps" if capped else ""), flush=True)
    return log, {"steps": step, "planned_steps": steps, "seconds": round(seconds_run, 1), "time_cap_hit": capped}


def recipe_line(argv: list[str]) -> str:
    """The command line, with the output directory (a path on this machine) written as OUT."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("OUT")
            skip = False
        elif a == "--out":
            out.append(a)
            skip = True
        elif a.startswith("--out="):
            out.append("--out=OUT")
        else:
            out.append(a)
    return " ".join(["scripts/train_tiny_nld.py", *out])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = recipe_line(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()  # system-wide, so every worker measures the same budget

    eval_questions = {p.question for p in data.evaluation_set()}
    corpus = itertools.islice(data.generate(args.seed + 1, eval_questions), TOKENIZER_SAMPLES)
    # questions and solutions as separate texts: both start right after a special token, without a space
    texts = [text for p in corpus for text in (p.question, p.answer)]
    if args.init_from is not None:  # the text model's own tokenizer, in the VLM layout
        from tokenizers import Tokenizer

        tokenizer = with_vlm_specials(Tokenizer.from_file(str(Path(args.init_from) / "tokenizer.json")))
    elif args.vlm:  # the picture questions and answers too, and the layout's special tokens (no BOS)
        said = itertools.islice(pictures.items(args.seed + 1), TOKENIZER_SAMPLES // 2)
        texts += [text for it in said for text in (it.question.question, it.question.answer)]
        texts += pictures.SYSTEM_PROMPTS
        tokenizer = train_tokenizer(texts, args.vocab, specials=VLM_SPECIAL_TOKENS, bos=False)
    else:
        tokenizer = train_tokenizer(texts, args.vocab)
    job = (args, recipe, tokenizer.to_str(), eval_questions, t0)
    if args.workers == 1:
        train_worker(0, *job)
        return 0
    with tempfile.TemporaryDirectory() as rendezvous:  # a file, not a port: nothing listens on the network
        mp.spawn(train_worker, args=(*job, Path(rendezvous) / "init"), nprocs=args.workers, join=True)
    return 0


def train_worker(rank: int, args: argparse.Namespace, recipe: str, tokenizer_json: str, eval_questions: set[str],
                 t0: float, rendezvous: Path | None = None) -> None:
    """One data-parallel worker: the same initial weights everywhere, its own slice of the data stream;
    worker 0 writes the checkpoint."""
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    if rendezvous is not None:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=args.workers)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    budget = args.time_budget * 60
    per_worker = args.batch_tokens // args.workers
    tokenizer = Tokenizer.from_str(tokenizer_json)
    vlm = vlm_config(args, tokenizer.get_vocab_size()) if args.vlm else None
    config = model_config(args, tokenizer.get_vocab_size()) if vlm is None else vlm.text
    files = tokenizer_files(tokenizer, vlm=args.vlm)
    if vlm is not None:
        processing = ProcessorConfig(longest_edge=args.longest_edge, patch_size=vlm.vision.patch_size,
                                     merge=vlm.spatial_merge_size)
        files[PREPROCESSOR_FILE] = json.dumps(processing.to_dict(), indent=2) + "\n"
    prompts = None
    with tempfile.TemporaryDirectory() as tmp:  # the checkpoint's own tokenizer files, chat template, processor
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        chat = NLDTokenizer(tmp)
        if vlm is not None:
            prompts = prompt_encoder(chat, vlm, Path(tmp))
    parameters = config.num_parameters() + (0 if vlm is None else vlm.vision_parameters())
    if is_main():
        print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; config vocab {config.vocab_size}; "
              f"{parameters / 1e6:.2f}M parameters"
              + ("" if vlm is None else f" ({vlm.vision_parameters() / 1e6:.2f}M in the tower and projector)")
              + f"; {args.workers} worker(s) x {per_worker} token slots per step", flush=True)

    model = init_weights(NLDModel(config), std=0.02, seed=args.seed).train()
    groups = [(list(model.parameters()), 1.0)]
    if args.init_from is not None:
        base = NLDConfig.from_file(args.init_from)
        weights = {k: v.float() for k, v in load_weights(args.init_from, base).items()}
        for name in ("encoder.embed_tokens.weight", "diffusion_head.weight"):
            for new_id, old_id in SEEDED_ROWS.items():
                weights[name][new_id] = weights[name][old_id]
        model.load_state_dict(weights, strict=True)
        groups = [(list(model.parameters()), args.backbone_lr_scale)]
    vision = None if vlm is None else init_weights(VisionEncoder(vlm), std=0.02, seed=args.seed + 1000).train()
    if vision is not None:
        # The tower's and projector's RMSNorm weights stay at 1 (set so by init_weights, and frozen): short runs
        # whose ln_pre weight was trained (it started as noise then, a bug) saw every image row become one large
        # constant, a picture the model had learned to ignore.
        norms = norm_weights(vision)
        for p in vision.parameters():
            p.requires_grad_(id(p) not in norms)
        groups.append(([p for p in vision.parameters() if p.requires_grad], 1.0))
    if args.weights_from is not None:  # continue a VLM: its backbone, tower and projector
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(Path(args.weights_from) / "model.safetensors")).items()}
        tower = {k[len("encoder."):]: v for k, v in state.items()
                 if k.startswith(("encoder.vision_tower.", "encoder.multi_modal_projector."))}
        model.load_state_dict({k: v for k, v in state.items() if k[len("encoder."):] not in tower}, strict=True)
        vision.load_state_dict(tower, strict=True)
    # the auxiliary probe (training only, not saved): each image row's cell labels (pictures.CELL_HEADS)
    heads, head_weights = tuple(pictures.CELL_HEADS.values()), tuple(pictures.CELL_HEAD_WEIGHTS.values())
    probe = None
    if vision is not None and args.probe_weight > 0:
        torch.manual_seed(args.seed + 5)
        probe = torch.nn.Linear(config.hidden_size, sum(heads))
        groups.append((list(probe.parameters()), 1.0))
    trained = [t for ts, _ in groups for t in ts]
    seed = args.seed + 2 + 1000 * rank
    if vlm is None:
        mix = data.ConversationMix(p_single=args.p_single, max_history=args.max_history, p_followup=args.p_followup,
                                   p_system=args.p_system)
        conversations = data.conversations(seed, eval_questions, mix)
    else:
        scenes = {it.scene.key for it in pictures.evaluation_items()}
        conversations = pictures.conversations(seed, scenes, eval_questions, pictures.PictureMix(p_text=args.p_text))
    stream = Batches(chat, conversations, per_worker, args.loss_on, seed, prompts)
    seen = torch.zeros(3, dtype=torch.float64)  # conversations, trained answers, answer tokens (this worker)

    def take() -> list[Example]:
        examples = stream.next()
        seen.add_(torch.tensor([len(examples), sum(len(e.spans) for e in examples),
                                sum(b - a for e in examples for a, b in e.spans)], dtype=torch.float64))
        return examples
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    eos_id = config.eos_token_ids[0]  # what fills a noisy block after the answer: </s> (text), <|im_end|> (VLM)
    g = torch.Generator().manual_seed(args.seed + 3 + 1000 * rank)
    joint_schedule = MaskSchedule(p_full=args.p_full)

    def joint_step(step: int):
        b = block_sizes[int(torch.randint(0, len(block_sizes), (1,), generator=g))]
        batch = make_batch(take(), b, MASK_ID, eos_id, g, joint_schedule, PAD_TO)
        losses = joint_loss(model, batch, args.dlm_weight, vision, probe, heads, args.probe_weight, head_weights,
                            args.look_weight, args.look_layer)
        logged = {"ar": losses.ar, "dlm": losses.dlm}
        if probe is not None:  # every worker logs the same keys (a batch without pictures counts 0)
            logged["cells"] = losses.cells or 0.0
        if args.look_weight > 0:
            logged["looks"] = losses.looks or 0.0
        return losses.total, logged

    def weights() -> dict[str, torch.Tensor]:
        state = dict(model.state_dict())
        if vision is not None:
            state.update({"encoder." + k: v for k, v in vision.state_dict().items()})
        return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}

    def snapshot(step: int) -> None:
        if args.save_every and step % args.save_every == 0 and is_main():
            where = save_checkpoint(f"{args.out}.step-{step}", config if vlm is None else vlm, weights(), files,
                                    overwrite=True)
            print(f"[joint] snapshot {where}", flush=True)

    phase1_s = budget * (1 - args.lora_share) - (time.monotonic() - t0)
    log, joint_run = train_phase("joint", args.steps, phase1_s, joint_step, groups, args.lr,
                                 args.log_every, wd=0.1, bf16=args.precision == "bf16", snapshot=snapshot)
    joint_seen = seen.clone()

    # Phase 2: the draft adapter, base (and tower) frozen, on fully masked blocks (the draft linear_spec feeds).
    for p in trained:
        p.requires_grad_(False)
    r, q = args.lora_rank, config.num_attention_heads * config.head_dim
    lg = torch.Generator().manual_seed(args.seed + 4)
    layers = {
        i: (torch.nn.Parameter(torch.randn(r, q, generator=lg) / math.sqrt(q)),
            torch.nn.Parameter(torch.zeros(config.hidden_size, r)))
        for i in range(config.num_hidden_layers)
    }
    alpha = 2.0 * r
    draft_schedule = MaskSchedule(p_full=0.9, p_aligned=0.2)

    def lora_step(step: int):
        b = block_sizes[int(torch.randint(0, len(block_sizes), (1,), generator=g))]
        batch = make_batch(take(), b, MASK_ID, eos_id, g, draft_schedule, PAD_TO)
        loss = draft_loss(model, batch, layers, alpha / r, vision)
        return loss, {"draft": loss.item()}

    phase2_s = budget - (time.monotonic() - t0) - 20
    lora_log, lora_run = train_phase("lora", args.lora_steps, max(phase2_s, 1.0), lora_step,
                                     [t for ab in layers.values() for t in ab], args.lora_lr, args.log_every,
                                     wd=0.0, bf16=args.precision == "bf16")
    log += lora_log
    lora_seen = seen - joint_seen
    if dist.is_initialized():
        dist.all_reduce(joint_seen)
        dist.all_reduce(lora_seen)

    if is_main():
        tensors = weights()
        lora = LoRAAdapter({i: (a.detach().to(torch.bfloat16), b_.detach().to(torch.bfloat16))
                            for i, (a, b_) in layers.items()}, r, alpha)
        out = save_checkpoint(args.out, config if vlm is None else vlm, tensors, files, lora=lora, overwrite=True)
        check_rendering(chat, out, data.qa_messages(data.evaluation_set(3), data.SYSTEM_PROMPTS[0]))
        if vlm is not None:
            picture_chat = next(pictures.conversations(args.seed, mix=pictures.PictureMix(p_text=0.0)))
            check_rendering(chat, out, picture_chat, prompts)

        def counts(t: torch.Tensor) -> dict:
            return dict(zip(("conversations", "answers", "answer_tokens"), (int(x) for x in t.tolist())))

        summary = {
            "recipe": recipe,
            "args": {k: v for k, v in vars(args).items() if k != "out"},  # where it was written is not the recipe
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16()},
            "init_from": None if args.init_from is None else checkpoint_digest(Path(args.init_from)),
            "weights_from": None if args.weights_from is None else checkpoint_digest(Path(args.weights_from)),
            "schedule": {
                "rule": "fixed steps (--steps, --lora-steps); --time-budget is a safety cap only",
                "joint": {**joint_run, **counts(joint_seen)},
                "lora": {**lora_run, **counts(lora_seen)},
            },
            "config": (config if vlm is None else vlm).to_dict(),
            "parameters": parameters,
            "tokenizer_vocab": tokenizer.get_vocab_size(),
            "wall_s": round(time.monotonic() - t0, 1),
            "final": {k: v for k, v in (log[-1] if log else {}).items()},
            "final_joint": next((e for e in reversed(log) if e["phase"] == "joint"), None),
            "mask_schedule": asdict(joint_schedule),
            "log": log,
        }
        (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {out} in {summary['wall_s']:.0f}s", flush=True)
    if dist.is_initialized():
        dist.barrier()  # every worker leaves together: none tears down the group while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
