"""A scripted soft model over a 6-token vocabulary, for testing sampling laws exactly.

Causal passes give next-token logits that are a fixed pseudo-random function of the context, so the exact
law of the first tokens of `ar` can be enumerated. Block passes give draft logits that differ from the
verifier's and depend on every chunk token already filled, so a draft drafted over several passes (threshold
> 0) really conditions on the order it was filled in. Token 5 is the MASK and is never predicted.
"""

from __future__ import annotations

import itertools
import random
import zlib

import torch

from nld_trt.config import NLDConfig
from toy_executor import ScriptedExecutor

V, MASK = 6, 5
PROMPT_LAW = (1, 3, 4)
CONFIG = NLDConfig(vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                   num_key_value_heads=1, head_dim=8, mask_token_id=MASK, bos_token_id=1, eos_token_ids=(),
                   pad_token_id=0, block_size=4, torch_dtype="float32", max_position_embeddings=64)


def _vector(*key) -> torch.Tensor:
    rng = random.Random(zlib.crc32(repr(key).encode()))  # not hash(): str hashes change per process
    row = torch.tensor([rng.gauss(0.0, 1.4) for _ in range(V)])
    row[MASK] = float("-inf")
    return row


def causal_logits(context: tuple[int, ...]) -> torch.Tensor:
    """Logits of the token after `context`."""
    return _vector("causal", context[-3:], len(context) % 5)


def draft_logits(context: tuple[int, ...], chunk: tuple[int, ...], j: int) -> torch.Tensor:
    """Draft logits of chunk position j: a perturbed guess that sees the filled chunk positions."""
    seen = tuple(t for t in chunk if t != MASK)
    return 0.6 * causal_logits(context + chunk[1:j]) + 0.8 * _vector("draft", context[-2:], chunk, j, len(seen))


class LawExecutor(ScriptedExecutor):
    vocab = V

    def __init__(self, max_batch: int = 512, max_seq_len: int = 32) -> None:
        super().__init__(CONFIG, max_batch, max_seq_len, max_chunk=8)

    def rows(self, context, chunk, block, lora):
        context, chunk = tuple(context), tuple(chunk)
        if block:
            return torch.stack([draft_logits(context + chunk[:1], chunk, j) if j else causal_logits(context)
                                for j in range(len(chunk))])
        return torch.stack([causal_logits(context + chunk[: j + 1]) for j in range(len(chunk))])


def filtered(probs: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> list[float]:
    """The filtered, renormalised law, written out plainly (the oracle for nld_trt.decoding.select)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(range(len(probs)))
    if top_k:
        kth = probs[order[top_k - 1]]
        keep = {i for i in keep if probs[i] >= kth}
    if top_p < 1.0:
        total = sum(probs[i] for i in keep)
        mass, nucleus = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            if mass < top_p:
                nucleus.add(i)
            mass += probs[i] / total
        keep = nucleus
    if min_p:
        total = sum(probs[i] for i in keep)
        top = max(probs[i] for i in keep) / total
        keep = {i for i in keep if probs[i] / total >= min_p * top}
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


def ar_law(prompt: tuple[int, ...], length: int, temperature: float = 1.0, **filters) -> dict[tuple[int, ...], float]:
    """The exact law of the first `length` tokens of sampled `ar` with these filters."""
    law = {}
    for tokens in itertools.product(range(V - 1), repeat=length):
        p = 1.0
        for i, tok in enumerate(tokens):
            probs = torch.softmax(causal_logits(prompt + tokens[:i]) / temperature, -1).tolist()
            p *= filtered(probs, **filters)[tok]
            if p == 0.0:
                break
        if p > 0:
            law[tokens] = p
    return law
