"""The model definition is numerically transformers' Ministral3Model plus a linear head."""

from __future__ import annotations

import pytest
import torch
from transformers import Ministral3Model

from nld_trt.attention import chunk_attention_mask
from nld_trt.model import NLDModel, init_weights
from nld_trt.tiny import tiny_config


def full_causal(model: NLDModel, tokens: torch.Tensor) -> torch.Tensor:
    b, t = tokens.shape
    zeros = torch.zeros(b, dtype=torch.long)
    mask = chunk_attention_mask(zeros, torch.full((b,), t), torch.zeros(b, dtype=torch.bool), t, t)
    return model.logits(model(tokens, torch.arange(t).expand(b, t), mask))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # GQA 2, YaRN, llama-4 scale from position 64
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=3),
        dict(num_key_value_heads=4),  # no grouping
    ],
)
def test_logits_match_transformers_ministral3_with_yarn_and_query_scale(overrides):
    config = tiny_config(**overrides)
    assert config.rope.original_max_position_embeddings == 64
    torch.manual_seed(0)
    ours = init_weights(NLDModel(config), std=0.1, seed=3).eval()
    oracle = Ministral3Model(config.to_transformers()).eval()
    backbone = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items() if k.startswith("encoder.")}
    oracle.load_state_dict(backbone, strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 200))  # positions up to 199: floor(p/64) reaches 3
    with torch.no_grad():
        mine = full_causal(ours, tokens)
        theirs = ours.logits(oracle(input_ids=tokens).last_hidden_state)
    assert (mine - theirs).abs().max().item() <= 1e-4
    # the comparison is not vacuous: logits vary, and the query scale matters past position 64
    assert mine.std().item() > 0.1
    with torch.no_grad():
        ours.rotary.beta = 0.0
        unscaled = full_causal(ours, tokens)
    assert (unscaled[:, :64] - mine[:, :64]).abs().max().item() <= 1e-5
    assert (unscaled[:, 64:] - mine[:, 64:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("mscale", [1.0, None])
def test_yarn_frequencies_and_attention_factor_come_from_transformers(mscale):
    from dataclasses import replace

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = tiny_config()
    config = replace(base, rope=replace(base.rope, mscale=mscale, mscale_all_dim=mscale))
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config.to_transformers(), None)
    model = NLDModel(config)
    assert torch.equal(model.rotary.inv_freq, inv_freq.float())
    assert model.rotary.attention_scaling == factor
    # mscale == mscale_all_dim cancels (the release); without them YaRN scales by 0.1 ln(16) + 1
    expected = 1.0 if mscale else 0.1 * torch.log(torch.tensor(16.0)).item() + 1.0
    assert abs(factor - expected) < 1e-6
