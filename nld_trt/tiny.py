"""Tiny NLD checkpoints in the exact release layout: tokenizer, chat template, random weights, LoRA.

Used by the tests (random models), by `scripts/make_tiny_checkpoint.py`, and by the training recipe of the
embedded default model (tokenizer and files). Special tokens follow the Mistral layout the release uses:
ids below 128 are reserved, `<s>`=1, `</s>`=2, `[INST]`=3, `[/INST]`=4, `<pad>`=11, `[THINK]`=34,
`[/THINK]`=35 and the mask token at 100.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import LoRAAdapter, save_checkpoint
from .config import NLDConfig, RopeConfig

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


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (digits split one by one) with the special tokens at ids 0..127."""
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
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return tok


def tokenizer_files(tokenizer) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                "mask_token": "<|mask|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 32768,
        **specials,
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
        "chat_template.jinja": CHAT_TEMPLATE,
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
