"""dlm equals a deliberately plain re-implementation of the spec: unbatched, explicit loops, no KV cache
(every pass recomputes the whole sequence under an explicit mask), whole blocks, truncation at the end."""

from __future__ import annotations

import random

import pytest
import torch

from nld_trt import load


def plain_dlm(model, prompt, block_length, threshold, max_new, eos, dlm_type, mask_id, embed=None):
    """shared/spec/nld-decoding.md, mode dlm, read literally. `embed` (tokens [1, T] -> embeddings [1, T, H]):
    the input embeddings where the prompt has image rows (tests/test_vlm_generate.py)."""
    net = model.model

    def logits_of(context, chunk, block):
        tokens = context + chunk
        n, t = len(context), len(tokens)
        mask = torch.zeros(t, t, dtype=torch.bool)
        for q in range(t):
            for k in range(t):
                mask[q, k] = k <= q or (block and q >= n and k >= n)
        with torch.no_grad():
            x = None if embed is None else embed(torch.tensor([tokens]))
            h = net(torch.tensor([tokens]), torch.arange(t)[None], mask[None, None], inputs_embeds=x)
            return net.logits(h)[0, n:].double()

    def argmax(row):
        return int(torch.argmax(row))

    context = list(prompt)
    t0 = argmax(logits_of(context[:-1], context[-1:], block=False)[-1])
    out = []
    n_blocks = -(-max_new // block_length)
    for _ in range(n_blocks):
        block = [t0] + [mask_id] * (block_length - 1)
        for _ in range(block_length):  # steps per block = B
            if mask_id not in block:
                break
            lg = logits_of(context, block, block=True)
            cand, conf = {}, {}
            for i in range(1, block_length):
                row = lg[i] if dlm_type == "llada" else lg[i - 1]
                probs = torch.softmax(row, -1)
                cand[i] = argmax(row)
                conf[i] = float(probs[cand[i]])
            masked = [i for i in range(1, block_length) if block[i] == mask_id]
            order = sorted(masked, key=lambda i: -conf[i])
            for rank, i in enumerate(order):
                if rank == 0 or conf[i] >= threshold:
                    block[i] = cand[i]
            eos_at = [i for i, tok in enumerate(block) if tok in eos]
            if eos_at and mask_id not in block[: eos_at[0]]:
                break
        out += block
        if any(tok in eos for tok in out):
            break
        context += block
        t0 = argmax(logits_of(context[:-1], context[-1:], block=False)[-1])
    for i, tok in enumerate(out):
        if tok in eos:
            out = out[: i + 1]
            break
    return out[:max_new]


@pytest.fixture(scope="module", params=["llada", "dream"])
def model64(request, tiny_dir, tiny_dir_b):
    """float64 so that the cached and the recomputed passes cannot differ by a rounding tie."""
    return load(tiny_dir if request.param == "llada" else tiny_dir_b, dtype="float64", max_batch=4, max_seq_len=256)


def prompts(seed, n=4):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 400) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


@pytest.mark.parametrize("threshold,block_length,max_new", [(0.9, 8, 24), (0.0, 8, 16), (1.0, 4, 12), (0.3, 8, 21)])
def test_dlm_equals_plain_reimplementation(model64, threshold, block_length, max_new):
    cfg = model64.config
    ps = prompts(seed=int(threshold * 10) + block_length)
    batched = model64.generate(ps, mode="dlm", threshold=threshold, block_length=block_length, max_new_tokens=max_new)
    for p, r in zip(ps, batched):
        expected = plain_dlm(model64, p, block_length, threshold, max_new, set(cfg.eos_token_ids), cfg.dlm_type,
                             cfg.mask_token_id)
        assert r.token_ids == expected
        single = model64.generate(p, mode="dlm", threshold=threshold, block_length=block_length, max_new_tokens=max_new)
        assert single.token_ids == r.token_ids  # batched equals unbatched
        full_blocks = r.stats.passes_per_block[: max_new // block_length]
        if threshold == 0.0:
            assert all(n == 1 for n in full_blocks)  # every masked position filled in one pass
        if threshold == 1.0:
            assert all(n == block_length - 1 for n in full_blocks)  # one position per pass


def test_dlm_stops_at_eos_inside_a_block_like_the_plain_version(model64):
    cfg = model64.config
    ps = prompts(seed=5)
    free = model64.generate(ps, mode="dlm", threshold=0.5, block_length=8, max_new_tokens=24, eos_token_ids=())
    for p, r in zip(ps, free):
        eos = r.token_ids[10]  # a token emitted in the middle of the second block
        got = model64.generate(p, mode="dlm", threshold=0.5, block_length=8, max_new_tokens=24, eos_token_ids=(eos,))
        expected = plain_dlm(model64, p, 8, 0.5, 24, {eos}, cfg.dlm_type, cfg.mask_token_id)
        assert got.token_ids == expected
        assert got.finish_reason == "eos" and got.token_ids[-1] == eos and len(got.token_ids) <= 11


def test_dlm_with_few_steps_per_block_still_decides_every_position(tiny):
    r = tiny.generate([1, 50, 60, 70], mode="dlm", block_length=8, threshold=1.0, steps_per_block=2,
                      max_new_tokens=32, eos_token_ids=())
    assert len(r.token_ids) == 32 and tiny.config.mask_token_id not in r.token_ids
    assert max(r.stats.passes_per_block) == 2
