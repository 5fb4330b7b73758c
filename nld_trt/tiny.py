"""Tiny NLD checkpoints in the exact release layout: tokenizer, chat template, random weights, LoRA.

Used by the tests (random models), by `scripts/make_tiny_checkpoint.py`, and by the training recipe of the
embedded default model (tokenizer and files). Special tokens follow the Mistral layout the release uses:
ids below 128 are reserved, `<s>`=1, `</s>`=2, `[INST]`=3, `[/INST]`=4, `<pad>`=11, `[THINK]`=34,
`[/THINK]`=35 and the mask token at 100.

Tiny vision-language checkpoints (`make_tiny_vlm_checkpoint`) follow the VLM release layout: config.json with
the text fields at the root plus `vision_config` (pixtral) and the projector fields, the tower and projector
under `encoder.`, the image tokens `<|image_start|>` 18, `<|image_pad|>` 19, `<|image_break|>` 20,
`<|image_end|>` 21, end of turn `<|im_end|>` 11 as EOS, and a ChatML template (no BOS) that writes one
`<|image_start|>` per image content part. Which ids ChatML's `<|im_start|>` (10) and `<think>`/`</think>`
(34/35) have in the release is not known here: these are this toolkit's choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import LoRAAdapter, save_checkpoint
from .config import VLM_MODEL_TYPE, NLDConfig, RopeConfig
from .vision.config import VisionConfig, VLMConfig

N_SPECIAL = 128
NAMED_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 11: "<pad>",
    17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 34: "[THINK]", 35: "[/THINK]", 100: "<|mask|>",
}
SPECIAL_TOKENS = [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(N_SPECIAL)]
BOS_ID, EOS_ID, PAD_ID, MASK_ID, THINK_ID, END_THINK_ID = 1, 2, 11, 100, 34, 35

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking %}{{- '[THINK]' }}{%- endif %}"
)

# Digits one by one, words with their leading space, punctuation runs, whitespace (see shared/recipes).
PRE_SPLIT = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

SAMPLE_TEXT = [
    "Tom has 12 apples. He gives 5 apples to Ann. 12 - 5 = 7. The answer is \\boxed{7}.",
    "A pack holds 6 pens. Sara buys 4 packs. 6 * 4 = 24. The answer is \\boxed{24}.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
    " must be in want of a wife.",
    "Question: what is 17 plus 25? Answer: 17 + 25 = 42.",
]


VLM_NAMED_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>", 18: "<|image_start|>",
    19: "<|image_pad|>", 20: "<|image_break|>", 21: "<|image_end|>", 34: "<think>", 35: "</think>", 100: "<|mask|>",
}
VLM_SPECIAL_TOKENS = [VLM_NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(N_SPECIAL)]
VLM_EOS_ID, IMAGE_START_ID, IMAGE_PAD_ID, IMAGE_BREAK_ID, IMAGE_END_ID = 11, 18, 19, 20, 21

# ChatML, no BOS; a content part of type image or image_url becomes one <|image_start|> (the processor expands
# it); the generation prompt opens the answer with an empty thought unless enable_thinking is set, and an
# earlier assistant turn is written the same way (an empty thought before its content unless the content opens
# one itself), with the newline between turns written before the next turn rather than after <|im_end|>: so a
# conversation renders its earlier turns exactly as their prompts and answers were, and a trained answer ends
# with the EOS (<|im_end|>). Every prompt with a generation prompt is plain ChatML.
VLM_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and not (message['content'] is string and "
    "message['content'].startswith('<think>')) %}{{- '<think></think>' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{{- '<|image_start|>' }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- else %}{{- '<think></think>' }}"
    "{%- endif %}{%- endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, specials: list[str] | None = None, bos: bool = True):
    """A byte-level BPE (digits split one by one) with the special tokens at ids 0..127 (`specials`, default
    the text release's layout); `bos`: encoding adds `<s>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials or SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return tok


def with_vlm_specials(tokenizer):
    """A tokenizer of the text layout (`train_tokenizer`'s, special tokens SPECIAL_TOKENS at ids 0..127) with the
    vision-language layout's special tokens at the same ids and no BOS added: its BPE, and so every ordinary
    token's id, unchanged (what lets a VLM start from a text model's weights)."""
    from tokenizers import Tokenizer

    raw = json.loads(tokenizer.to_str())
    vocab = raw["model"]["vocab"]
    for t in raw["added_tokens"]:
        i = t["id"]
        if i >= N_SPECIAL or t["content"] != SPECIAL_TOKENS[i] or vocab.get(t["content"]) != i:
            raise ValueError(f"not the text layout's tokenizer: special token {i} is {t['content']!r}")
        del vocab[t["content"]]
        t["content"] = vocab_name = VLM_SPECIAL_TOKENS[i]
        vocab[vocab_name] = i
    raw["post_processor"] = None
    return Tokenizer.from_str(json.dumps(raw))


def tokenizer_files(tokenizer, vlm: bool = False) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja (`vlm`: the
    vision-language layout's ChatML template and end-of-turn EOS)."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                "mask_token": "<|mask|>"}
    if vlm:
        specials = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "mask_token": "<|mask|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": not vlm,
        "add_eos_token": False,
        "model_max_length": 32768,
        **specials,
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
        "chat_template.jinja": VLM_CHAT_TEMPLATE if vlm else CHAT_TEMPLATE,
    }


def tiny_config(**overrides) -> NLDConfig:
    """A small NLD configuration with YaRN and the llama-4 query scale active from position 64."""
    rope = RopeConfig(
        rope_type="yarn", rope_theta=1_000_000.0, factor=16.0, original_max_position_embeddings=64,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1,
    )
    fields = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mask_token_id=MASK_ID, rope=rope, max_position_embeddings=1024,
        bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID, block_size=32, torch_dtype="float32",
    )
    fields.update(overrides)
    return NLDConfig(**fields)


def random_tensors(config: NLDConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    from .model import NLDModel, init_weights

    model = init_weights(NLDModel(config), std=std, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def random_lora(config: NLDConfig, rank: int = 4, seed: int = 1, std: float = 0.05) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    q = config.num_attention_heads * config.head_dim
    layers = {
        i: (torch.randn(rank, q, generator=g) * std, torch.randn(config.hidden_size, rank, generator=g) * std)
        for i in range(config.num_hidden_layers)
    }
    return LoRAAdapter(layers, rank, alpha=2.0 * rank)


def make_tiny_checkpoint(
    path: str | Path,
    seed: int = 0,
    std: float = 0.02,
    lora_rank: int | None = 4,
    shards: int = 1,
    overwrite: bool = False,
    **config_overrides,
) -> Path:
    """A random tiny NLD checkpoint in the release layout (a few hundred KB)."""
    config = tiny_config(**config_overrides)
    tokenizer = train_tokenizer(SAMPLE_TEXT * 4, vocab_size=min(config.vocab_size, N_SPECIAL + 256 + 64))
    lora = random_lora(config, lora_rank, seed + 1) if lora_rank else None
    return save_checkpoint(
        path, config, random_tensors(config, seed, std), tokenizer_files(tokenizer), lora, shards, overwrite
    )


def tiny_vlm_config(vision: dict | None = None, **text_overrides) -> VLMConfig:
    """A small vision-language configuration: the tiny text model (as `tiny_config`, EOS the end-of-turn token)
    and a 2-layer Pixtral tower of width 32 with the release's patch 14 and 2x2 merge."""
    text = tiny_config(**{"model_type": VLM_MODEL_TYPE, "eos_token_ids": (VLM_EOS_ID,), "pad_token_id": None,
                          **text_overrides})
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  hidden_act="silu", rope_theta=10000.0, image_size=1540)
    fields.update(vision or {})
    return VLMConfig(text=text, vision=VisionConfig(**fields))


def random_vision_tensors(config: VLMConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tower and projector weights (norm weights near 1, so they matter), release names."""
    from .vision.tower import VisionEncoder

    g = torch.Generator().manual_seed(seed + 1000)
    out = {}
    for name, p in VisionEncoder(config).state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        out["encoder." + name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else noise * std
    return out


def make_tiny_vlm_checkpoint(
    path: str | Path,
    seed: int = 0,
    std: float = 0.02,
    vision_std: float = 0.05,
    lora_rank: int | None = 4,
    spelling: str = "release",
    overwrite: bool = False,
    vision: dict | None = None,
    **text_overrides,
) -> Path:
    """A random tiny Nemotron-Labs-Diffusion-VLM checkpoint in the release layout (`spelling` "llava": the tower,
    projector and text tensors named `vision_tower.*`, `multi_modal_projector.*`, `language_model.*`, as one
    public port assumes)."""
    from safetensors.torch import load_file, save_file

    from .vision.config import PROJECTOR_PREFIX, VISION_PREFIX

    config = tiny_vlm_config(vision, **text_overrides)
    tokenizer = train_tokenizer(SAMPLE_TEXT * 4, vocab_size=min(config.text.vocab_size, N_SPECIAL + 256 + 64),
                                specials=VLM_SPECIAL_TOKENS, bos=False)
    tensors = {**random_tensors(config.text, seed, std), **random_vision_tensors(config, seed, vision_std)}
    lora = random_lora(config.text, lora_rank, seed + 1) if lora_rank else None
    out = save_checkpoint(path, config, tensors, tokenizer_files(tokenizer, vlm=True), lora, 1, overwrite)
    if spelling == "llava":
        weights = out / "model.safetensors"
        renamed = {}
        for name, t in load_file(str(weights)).items():
            if name.startswith((VISION_PREFIX, PROJECTOR_PREFIX)):
                renamed[name.removeprefix("encoder.")] = t
            else:
                renamed["language_model." + name] = t
        save_file(renamed, str(weights), metadata={"format": "pt"})
    elif spelling != "release":
        raise ValueError(f"spelling must be 'release' or 'llava', got {spelling!r}")
    return out
