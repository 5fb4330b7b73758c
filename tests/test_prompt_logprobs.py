"""Prompt log-probabilities (`prompt_logprobs`): each prompt token's log-probability from the causal prefill pass,
checked against the PyTorch reference's causal log-softmax at every prompt position (a full causal pass of the
model with no KV cache), in pieces, batched with requests that did not ask, and with no generation at all."""

from __future__ import annotations

import pytest
import torch

from nld_trt.attention import chunk_attention_mask
from nld_trt.errors import GenerationError

PROMPTS = [[1, 40, 41, 42, 7, 9, 300, 12, 5, 77, 100, 3], [2, 8, 8, 8, 250, 17]]


def reference_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the causal logits over the whole prompt, [T, V] float64: row j predicts token j + 1."""
    tokens = torch.tensor([prompt])
    t = len(prompt)
    mask = chunk_attention_mask(torch.zeros(1, dtype=torch.long), torch.tensor([t]), torch.zeros(1, dtype=torch.bool),
                                t, t)
    with torch.no_grad():
        logits = model.logits(model(tokens, torch.arange(t)[None], mask))[0]
    return torch.log_softmax(logits.double(), -1)


def check_against_reference(model, prompt, entries, top: int) -> None:
    ref = reference_logprobs(model, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        e, row = entries[i], ref[i - 1]
        assert e.token_id == prompt[i]
        assert e.logprob == pytest.approx(float(row[prompt[i]]), abs=1e-4)
        assert e.rank == 1 + int((row > row[prompt[i]] + 1e-9).sum())
        assert [t for t, _ in e.top] == row.topk(top).indices.tolist()
        assert [v for _, v in e.top] == pytest.approx(row.topk(top).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_prompt_logprobs_equal_the_reference_causal_log_softmax(tiny, mode):
    r = tiny.generate(PROMPTS[0], mode=mode, block_length=4, max_new_tokens=6, prompt_logprobs=3)
    check_against_reference(tiny.model, PROMPTS[0], r.prompt_logprobs, 3)
    plain = tiny.generate(PROMPTS[0], mode=mode, block_length=4, max_new_tokens=6)
    assert r.token_ids == plain.token_ids and plain.prompt_logprobs is None
    assert r.as_dict()["prompt_logprobs"][0] is None and r.as_dict()["prompt_logprobs"][1]["token_id"] == PROMPTS[0][1]


def test_a_prompt_prefilled_in_pieces_is_scored_whole(tiny):
    executor = tiny.executor
    saved = executor.max_prefill_chunk
    executor.max_prefill_chunk = 5  # 12 tokens: pieces of 5, 5 and 2
    try:
        r = tiny.generate(PROMPTS, max_new_tokens=3, prompt_logprobs=0)
    finally:
        executor.max_prefill_chunk = saved
    for prompt, result in zip(PROMPTS, r):
        check_against_reference(tiny.model, prompt, result.prompt_logprobs, 0)


def test_asking_for_prompt_logprobs_leaves_the_other_requests_of_the_batch_alone(tiny):
    from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run

    def seqs(scored: bool):
        out = []
        for i, prompt in enumerate(PROMPTS):
            p = GenerationParams(mode="linear_spec", block_length=4, max_new_tokens=10,
                                 prompt_logprobs=1 if scored and i == 0 else None).resolved(tiny.config)
            out.append(SEQUENCE_TYPES[p.mode](prompt, p, tiny.config, 0))
        return out

    mixed, plain = run(tiny.executor, seqs(True)), run(tiny.executor, seqs(False))
    assert [s.out for s in mixed] == [s.out for s in plain]
    assert mixed[0].prompt_logprobs is not None and mixed[1].prompt_logprobs is None


def test_max_new_tokens_zero_scores_the_prompt_only(tiny):
    r = tiny.generate(PROMPTS[1], max_new_tokens=0, prompt_logprobs=2)
    assert r.token_ids == [] and r.finish_reason == "length" and r.text == ""
    check_against_reference(tiny.model, PROMPTS[1], r.prompt_logprobs, 2)
    with pytest.raises(GenerationError, match=r"max_new_tokens must be an integer in \[1, "):
        tiny.generate(PROMPTS[1], max_new_tokens=0)
    with pytest.raises(GenerationError, match=r"prompt_logprobs must be an integer in \[0, 20\], got 21"):
        tiny.generate(PROMPTS[1], max_new_tokens=2, prompt_logprobs=21)
